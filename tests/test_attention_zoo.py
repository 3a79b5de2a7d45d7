"""The attention zoo (coord, ge, gc, simam, nonlocal, chsa, psa) and user-defined types:
exact identity at init on a real model, gradients within two steps, exact parameter counts,
odd shapes, and the ways a user's own class gets in."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import retrofit
from retrofit import AttentionError, RuleError, create_attention, get_attention, get_report, list_attention
from retrofit.attention import (
    GatherExcite,
    PointwiseSpatialAttn,
    SimAM,
    identity_error,
    register_attention,
)
from retrofit.fuse import gate_methods, gated_residual
from retrofit.rulefile import builtin_rules_dir, load_rules, parse_rules

from .attention_helpers import ChannelScale, NotIdentity
from .checks import assert_every_parameter_learns
from .conftest import cached

NEW = ["coord", "ge", "gc", "simam", "nonlocal", "chsa", "psa"]
ADDITIVE = ["nonlocal", "chsa", "psa"]  # no sigmoid gate: x + f(x), f's output projection at zero

# Every variant worth proving: (name, constructor arguments).
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("coord", {}),
    ("ge", {}),  # GE-θ⁻, global extent
    ("ge", {"extent": 3}),  # GE-θ⁻, local extent
    ("ge", {"extra_params": True}),  # GE-θ, global extent
    ("ge", {"extent": 4, "extra_params": True}),  # GE-θ, two stride-2 depthwise convolutions
    ("ge", {"extent": 2, "extra_params": True, "use_mlp": True}),  # GE-θ⁺
    ("gc", {}),
    ("gc", {"fuse_scale": True}),
    ("gc", {"fuse_add": False, "fuse_scale": True}),
    ("simam", {}),
    ("nonlocal", {}),
    ("nonlocal", {"sub_sample": True}),
    ("chsa", {}),
    ("chsa", {"pool_size": 2, "num_heads": 2}),
    ("psa", {}),
    ("psa", {"mask_size": 3}),
]
GATED = [(n, a) for n, a in VARIANTS if n not in ADDITIVE and (n != "gc" or a.get("fuse_scale"))]
NOT_GATED = [(n, a) for n, a in VARIANTS if (n, a) not in GATED]


def vid(v: tuple[str, dict[str, Any]]) -> str:
    name, args = v
    return name + "".join(f"-{k}={val}" for k, val in args.items())


# ---- closed forms, written out from the papers' layer shapes -------------------------------


def rd8(v: float) -> int:
    """timm's make_divisible(v, 8, round_limit=0)."""
    return max(8, int(v + 4) // 8 * 8)


def rd1(v: float) -> int:
    """timm's make_divisible(v, 1, round_limit=0)."""
    return max(1, int(v + 0.5))


def coord_width(c: int) -> int:
    """The official code's hidden width (Hou et al., CoordAtt): ``mip = max(8, inp // 32)``."""
    return max(8, c // 32)


def coord_params(c: int) -> int:
    rd = coord_width(c)
    return (c * rd + rd) + 2 * (rd * c + c)  # shared conv, conv_h and conv_w (all biased)


def ge_minus_params(c: int) -> int:
    return c  # one scale alpha per channel


def ge_theta_global_params(c: int) -> int:
    return c * 7 * 7 + c  # one depthwise 7x7 convolution with bias


def ge_theta_extent4_params(c: int) -> int:
    return 2 * (c * 3 * 3 + c)  # log2(4) depthwise 3x3 convolutions with bias


def ge_theta_plus_params(c: int) -> int:
    rd = rd1(c / 16)
    return (c * 3 * 3 + c) + (c * rd + rd) + (rd * c + c)  # one depthwise conv, then the MLP


def gc_branch(c: int) -> int:
    rd = rd1(c / 16)
    return (c * rd + rd) + 2 * rd + (rd * c + c)  # linear, LayerNorm, linear


def gc_params(c: int) -> int:
    return (c + 1) + gc_branch(c)  # the 1x1 score convolution, the add branch


def gc_both_params(c: int) -> int:
    return (c + 1) + 2 * gc_branch(c)


def gc_scale_params(c: int) -> int:
    return (c + 1) + gc_branch(c)


def simam_params(c: int) -> int:
    return c  # one blend weight alpha per channel


def nonlocal_params(c: int) -> int:
    rd = rd8(c / 8)
    return 3 * (c * rd + rd) + (rd * c + c)  # theta, phi, g, W_z (all biased 1x1)


def chsa_params(c: int) -> int:
    d = 8 * 8  # token width: each channel pooled to 8x8
    return 2 * c + (3 * d * d + 3 * d) + (d * d + d)  # GroupNorm, in-projection, out-projection


def psa_params(c: int, mask_size: int = 14) -> int:
    rd = rd8(c / 8)
    masks = (2 * mask_size - 1) ** 2
    branch = (c * rd + rd) + (rd * rd + rd) + (rd * masks + masks)  # reduce, hidden, mask predictor
    return 2 * branch + (2 * rd * c + c)  # collect, distribute, projection


CLOSED_FORM = {
    "coord": coord_params,
    "ge": ge_minus_params,
    "ge-extent=3": ge_minus_params,
    "ge-extra_params=True": ge_theta_global_params,
    "ge-extent=4-extra_params=True": ge_theta_extent4_params,
    "ge-extent=2-extra_params=True-use_mlp=True": ge_theta_plus_params,
    "gc": gc_params,
    "gc-fuse_scale=True": gc_both_params,
    "gc-fuse_add=False-fuse_scale=True": gc_scale_params,
    "simam": simam_params,
    "nonlocal": nonlocal_params,
    "nonlocal-sub_sample=True": nonlocal_params,
    "chsa": chsa_params,
    "chsa-pool_size=2-num_heads=2": lambda c: 2 * c + 4 * 4 * 4 + 4 * 4,
    "psa": psa_params,
    "psa-mask_size=3": lambda c: psa_params(c, 3),
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def perturbed(name: str, channels: int, **args: Any) -> nn.Module:
    """The module with every parameter moved off its init, so it is no identity."""
    torch.manual_seed(0)
    m = create_attention(name, channels, **args)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


# ---- identity at init ----------------------------------------------------------------------


def assert_identity_on(gm: torch.fx.GraphModule, model: str) -> None:
    report = get_report(gm)
    assert report.rows, "no site selected"
    assert report.max_abs_diff == 0.0  # eval mode, from the report
    reference = copy.deepcopy(cached(model)).train()
    gm.train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(gm(x), reference(x))  # train mode: batch statistics, same outputs


@pytest.mark.parametrize("name", NEW)
def test_builtin_rules_are_an_exact_identity_on_a_real_model(name: str) -> None:
    gm = retrofit.retrofit(cached("resnet18"), rules=builtin_rules_dir() / f"{name}.toml", input_size=64)
    assert {r.attn for r in get_report(gm).rows} == {name}
    assert_identity_on(gm, "resnet18")


def test_variants_are_an_exact_identity_on_a_real_model() -> None:
    """One rewrite, one variant per residual block (the default-argument ones are above)."""
    variants = [v for v in VARIANTS if v[1] and v != ("nonlocal", {"sub_sample": True})]  # that one is built in
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert len(variants) == len(blocks)
    rules = parse_rules({"rule": [
        {"at": "residual-add", "attn": name, "args": args, "include": [block],
         "position": "after" if name in ADDITIVE else "branch"}
        for (name, args), block in zip(variants, blocks, strict=True)
    ]})
    gm = retrofit.retrofit(cached("resnet18"), rules=rules, input_size=64)
    assert [r.attn for r in get_report(gm).rows] == [name for name, _ in variants]
    assert_identity_on(gm, "resnet18")


def test_additive_types_on_the_branch() -> None:
    """The attribute of a module named after a keyword ("nonlocal") must still be valid code."""
    rules = parse_rules({"rule": [{"at": "residual-add", "attn": name, "include": [f"layer{i}.1"]}
                                  for i, name in enumerate(ADDITIVE, 2)]})
    assert_identity_on(retrofit.retrofit(cached("resnet18"), rules=rules, input_size=64), "resnet18")


@given(
    variant=st.sampled_from(VARIANTS),
    channels=st.sampled_from([1, 3, 16]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    batch=st.integers(1, 2),
    train=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
@settings(max_examples=60, deadline=None)
def test_identity_is_exact_for_any_input(variant, channels, h, w, batch, train, scale) -> None:
    name, args = variant
    torch.manual_seed(channels * 100 + h * 10 + w)
    m = create_attention(name, channels, **args).train(train)
    x = torch.randn(batch, channels, h, w) * scale
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_identity_is_exact_in_other_dtypes(name: str, dtype: torch.dtype) -> None:
    m = create_attention(name, 16, dtype=dtype)
    x = torch.randn(2, 16, 5, 7, dtype=dtype)
    assert torch.equal(m(x), x)
    assert all(p.dtype == dtype for p in m.parameters())


def test_reset_parameters_restores_identity() -> None:
    x = torch.randn(2, 8, 5, 3)
    for name, args in VARIANTS:
        m = perturbed(name, 8, **args)
        assert not torch.equal(m(x), x), name
        m.reset_parameters()
        assert torch.equal(m(x), x), name


# ---- gate forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", GATED, ids=vid)
def test_sigmoid_gate_changes_output(variant: tuple[str, dict[str, Any]]) -> None:
    name, args = variant
    torch.manual_seed(0)
    m = create_attention(name, 16, gate="sigmoid", **args)
    x = torch.randn(2, 16, 5, 5)
    y = m(x)
    assert y.shape == x.shape and not torch.equal(y, x)


@pytest.mark.parametrize("variant", NOT_GATED, ids=vid)
def test_sigmoid_gate_is_refused_without_a_gate(variant: tuple[str, dict[str, Any]]) -> None:
    name, args = variant
    with pytest.raises(AttentionError, match=rf"attention '{name}' has no sigmoid gate: .* use gate='identity'"):
        create_attention(name, 16, gate="sigmoid", **args)


def test_gc_sigmoid_hint_names_the_scale_fusion() -> None:
    with pytest.raises(AttentionError, match=r"or fuse_scale=True for the paper's scale fusion"):
        create_attention("gc", 16, gate="sigmoid")


def test_ge_sigmoid_is_the_papers_theta_minus() -> None:
    """alpha starts at 1: the gate is exactly sigma(gather(x)), as in the paper."""
    x = torch.randn(2, 8, 7, 5)
    glob = GatherExcite(8, gate="sigmoid")
    assert torch.equal(glob(x), x * torch.sigmoid(x.mean((2, 3), keepdim=True)))
    local = GatherExcite(8, extent=2, gate="sigmoid")
    pooled = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
    assert torch.equal(local(x), x * torch.sigmoid(F.interpolate(pooled, size=(7, 5), mode="nearest")))


def test_simam_sigmoid_is_the_papers_gate() -> None:
    x = torch.randn(2, 8, 7, 5)
    n = 7 * 5 - 1
    d = (x - x.mean((2, 3), keepdim=True)).pow(2)
    e_inv = d / (4 * (d.sum((2, 3), keepdim=True) / n + 1e-4)) + 0.5
    torch.testing.assert_close(SimAM(8, gate="sigmoid")(x), x * torch.sigmoid(e_inv))


# ---- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_every_parameter_gets_gradient_within_two_steps(variant: tuple[str, dict[str, Any]]) -> None:
    name, args = variant
    torch.manual_seed(0)
    m = create_attention(name, 32, **args)
    assert_every_parameter_learns(m, 32)


# ---- parameter counts and shapes ------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("channels", [1, 3, 7, 64, 256, 2048])
def test_parameter_count_closed_form(variant: tuple[str, dict[str, Any]], channels: int) -> None:
    name, args = variant
    want = CLOSED_FORM[vid(variant)](channels)
    gates = ["identity", "sigmoid"] if variant in GATED else ["identity"]
    for gate in gates:
        assert n_params(create_attention(name, channels, gate=gate, **args)) == want


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(7, 7), (1, 1), (7, 5), (2, 9)])
def test_odd_shapes(variant: tuple[str, dict[str, Any]], channels: int, size: tuple[int, int]) -> None:
    name, args = variant
    m = perturbed(name, channels, **args)
    x = torch.randn(2, channels, *size)
    for train in (True, False):
        y = m.train(train)(x)
        assert y.shape == x.shape and torch.isfinite(y).all()


def test_large_maps_stay_bounded() -> None:
    """PSA pools a 40x40 map to its mask size; sub-sampled non-local quarters the keys."""
    x = torch.randn(1, 8, 40, 40)
    psa = perturbed("psa", 8, mask_size=5)
    assert psa(x).shape == x.shape
    nl = create_attention("nonlocal", 8, sub_sample=True)
    assert nl._pool(nl.phi(x)).shape[-2:] == (20, 20)


# ---- mechanisms ----------------------------------------------------------------------------


def test_psa_attention_is_the_centred_crop_of_each_positions_mask() -> None:
    torch.manual_seed(0)
    m = PointwiseSpatialAttn(8, mask_size=4)
    h, w, k = 3, 4, 2 * 4 - 1
    y = torch.randn(1, m.collect["reduce"][0].out_channels, h, w)
    a = m.attention(m.collect, y)[0]
    masks = m.collect["mask"](y)[0].reshape(k, k, h, w)
    for p in range(h * w):
        hp, wp = divmod(p, w)
        crop = masks[4 - 1 - hp : 4 - 1 - hp + h, 4 - 1 - wp : 4 - 1 - wp + w, hp, wp]
        torch.testing.assert_close(a[p], crop.flatten().softmax(0))


@pytest.mark.parametrize("variant", [v for v in GATED if v[0] != "gc"], ids=vid)
def test_declared_fused_gates_match_forward(variant: tuple[str, dict[str, Any]]) -> None:
    """``fused_gates = ("scale",)`` promises ``forward(x) == x * scale(x)``; the rewrite relies on it."""
    name, args = variant
    m = perturbed(name, 8, **args)
    x, shortcut = torch.randn(2, 8, 7, 5), torch.randn(2, 8, 7, 5)
    assert gate_methods(m) == ("scale",)
    assert torch.equal(m(x), x * m.scale(x))
    torch.testing.assert_close(gated_residual(m, x, shortcut), m(x) + shortcut)


@pytest.mark.parametrize("channels,want", [(32, 8), (256, 8), (320, 10), (512, 16), (960, 30), (2048, 64)])
def test_coord_width_is_the_official_codes(channels: int, want: int) -> None:
    """max(8, C // 32): C=320 gives 10 and C=960 gives 30 (timm's rounding to multiples of 8: 8 and 32)."""
    assert coord_width(channels) == want
    m = create_attention("coord", channels)
    assert m.conv1.out_channels == want
    assert n_params(m) == coord_params(channels)
    assert create_attention("coord", 960, rd_channels=24).conv1.out_channels == 24  # the argument overrides it
    assert create_attention("coord", 960, rd_ratio=1 / 3).conv1.out_channels == 320  # floor(960 / 3), not 319
    assert create_attention("coord", 960, min_rd_channels=64).conv1.out_channels == 64
    assert create_attention("coord", 960, rd_divisor=8).conv1.out_channels == 24  # 30 rounded down to 8s


def _psamask(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The official ``psamask`` (github.com/hszhao/semseg, lib/psa), written as its loops.

    ``mask`` is (N, K*K, H, W): at position p = (h, w), channel (hi, wi) is p's weight for
    the position q = (h + hi - K//2, w + wi - K//2). The result is (N, H*W, H, W): collect
    writes it at [q, p], distribute at [p, q] (first index: the bmm's summed axis).
    """
    n, kk, h, w = mask.shape
    k = math.isqrt(kk)
    half = k // 2
    out = torch.zeros(n, h * w, h, w, dtype=mask.dtype)
    for b in range(n):
        for hp in range(h):
            for wp in range(w):
                for hi in range(max(0, half - hp), min(k, h + half - hp)):
                    for wi in range(max(0, half - wp), min(k, w + half - wp)):
                        hq, wq = hp + hi - half, wp + wi - half
                        value = mask[b, hi * k + wi, hp, wp]
                        if mode == "collect":
                            out[b, hq * w + wq, hp, wp] = value
                        else:
                            out[b, hp * w + wp, hq, wq] = value
    return out


def _psanet_branch(branch: nn.ModuleDict, x: torch.Tensor, mode: str, softmax_dim: int = 1) -> torch.Tensor:
    """One PSANet branch as the official forward: psamask, softmax over dim 1, then
    ``bmm(x (N, C, HW), y (N, HW, HW))``."""
    y = branch["reduce"](x)
    n, c, h, w = y.shape
    a = _psamask(branch["mask"](y), mode).reshape(n, h * w, h * w).softmax(dim=softmax_dim)
    return torch.bmm(y.reshape(n, c, h * w), a).reshape(n, c, h, w)


@pytest.mark.parametrize("size", [(3, 4), (4, 4), (1, 3)])
def test_psa_matches_the_official_psamask_in_both_modes(size: tuple[int, int]) -> None:
    """Weights transplanted: collect and distribute equal the official code's formula."""
    m = perturbed("psa", 6, mask_size=4).double()
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    with torch.no_grad():
        col = _psanet_branch(m.collect, x, "collect")
        dis = _psanet_branch(m.distribute, x, "distribute")
        want = m.proj(torch.cat([col, dis], dim=1))
        torch.testing.assert_close(m.delta(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m(x), x + want, rtol=1e-12, atol=1e-12)
        # Distribute normalizes the weights arriving at a target over the positions that
        # send them, not each sender's weights over its targets (what a transposed collect does).
        per_owner = _psanet_branch(m.distribute, x, "distribute", softmax_dim=2)
        assert not torch.allclose(dis, per_owner)


def test_coord_gates_follow_rows_and_columns() -> None:
    m = perturbed("coord", 4)
    a_h, a_w = m.gates(torch.randn(2, 4, 7, 5))
    assert a_h.shape == (2, 4, 7, 1) and a_w.shape == (2, 4, 1, 5)


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("ge", {"extent": 1}, r"ge: extent = 1 is not valid \(0 for global, or an integer >= 2\)"),
        ("ge", {"extent": 6, "extra_params": True}, r"extent = 6 is not valid \(0 for global, or a power of two"),
        ("gc", {"fuse_add": False}, r"gc: set fuse_add, fuse_scale or both"),
        ("chsa", {"num_heads": 5}, r"chsa: num_heads = 5 must divide the token width pool_size \*\* 2 = 64"),
        ("psa", {"mask_size": 0}, r"psa: mask_size = 0 must be at least 1"),
        ("coord", {"rd_ratio": 0}, r"coord: rd_ratio = 0 is not valid: it is the bottleneck width as a fraction"),
        ("coord", {"min_rd_channels": 0}, r"coord: min_rd_channels = 0 is not valid: an integer >= 1"),
        ("gc", {"rd_ratio": -0.5}, r"gc: rd_ratio = -0.5 is not valid"),
        ("nonlocal", {"rd_channels": 0}, r"nonlocal: rd_channels = 0 is not valid: the bottleneck width, an integer"),
        ("psa", {"rd_divisor": 0}, r"psa: rd_divisor = 0 is not valid: the width is rounded to a multiple of it"),
        ("ge", {"use_mlp": True, "rd_ratio": "1/16"}, r"ge: rd_ratio = '1/16' is not valid"),
        ("gc", {"act_layer": "no_such_act"}, r"gc: unknown activation act_layer = 'no_such_act'; give a timm"),
        ("psa", {"act_layer": None}, r"psa: act_layer = None is not an activation"),
    ],
)
def test_invalid_arguments(name: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(AttentionError, match=message):
        create_attention(name, 16, **args)


# ---- built-in rule files --------------------------------------------------------------------


def test_new_types_are_registered_and_have_rule_files() -> None:
    assert set(NEW) <= set(list_attention())
    builtins = retrofit.list_builtin_rules()
    assert set(NEW) <= set(builtins) and all(builtins[n] for n in NEW)


@pytest.mark.parametrize("name,args", [("nonlocal", {"sub_sample": True}), ("psa", {"mask_size": 7})])
def test_quadratic_types_only_take_small_maps(name: str, args: dict[str, Any]) -> None:
    """At 224x224 only ResNet-50's last two stages (14x14 and 7x7) get them, sub-sampled."""
    the_plan = retrofit.plan(cached("resnet50"), attn=name, input_size=224)
    assert [p.site.path for p in the_plan.placements] == [f"layer3.{i}" for i in range(6)] + [
        f"layer4.{i}" for i in range(3)
    ]
    assert all(max(p.site.size) <= 14 and dict(p.args) == args and p.position == "after" for p in the_plan.placements)


# ---- user-defined types ---------------------------------------------------------------------


class _OutsideScale(ChannelScale):
    """Registered from outside the package, by the decorator (in the fixture below)."""


@pytest.fixture
def user_types() -> Iterator[None]:
    """Registers ``zoo_test_scale``; afterwards the registry is as before (imported
    ``module:Class`` names included), so other tests' lists of valid names are unchanged."""
    before = set(retrofit.list_attention())
    register_attention("zoo_test_scale")(_OutsideScale)
    yield
    for name in set(retrofit.list_attention()) - before:
        retrofit.attention.unregister_attention(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


@pytest.mark.usefixtures("user_types")
def test_registered_class_from_outside_works_from_a_rule_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "zoo_test_scale"\n')
    gm = retrofit.retrofit(cached("resnet18"), rules=path, input_size=64)
    report = get_report(gm)
    assert {r.attn for r in report.rows} == {"zoo_test_scale"} and len(report.rows) == 8
    assert isinstance(gm.get_submodule(report.rows[0].module), _OutsideScale)
    assert_identity_on(gm, "resnet18")


@pytest.mark.usefixtures("user_types")
def test_registered_class_from_outside_works_from_python_rules() -> None:
    rules = parse_rules({"rule": [{"at": "residual-add", "attn": "zoo_test_scale", "include": ["layer4.*"]}]})
    report = get_report(retrofit.retrofit(cached("resnet18"), rules=rules, input_size=64))
    assert [r.module for r in report.rows] == ["layer4.0.zoo_test_scale", "layer4.1.zoo_test_scale"]
    assert report.max_abs_diff == 0.0


@pytest.mark.usefixtures("user_types")
def test_imported_class_from_a_rule_file(tmp_path: Path) -> None:
    spec = "tests.attention_helpers:ChannelScale"
    path = write(tmp_path, f'[[rule]]\nat = "residual-add"\nattn = "{spec}"\ninclude = ["layer3.*"]\n')
    gm = retrofit.retrofit(cached("resnet18"), rules=path, input_size=64)
    report = get_report(gm)
    assert [r.attn for r in report.rows] == [spec, spec] and report.max_abs_diff == 0.0
    assert type(gm.get_submodule(report.rows[0].module)) is ChannelScale
    assert get_attention(spec) is ChannelScale


@pytest.mark.usefixtures("user_types")
def test_imported_class_gets_a_plain_attribute_name() -> None:
    """The new submodule is a direct child of its block, with no ':' in its name."""
    rules = parse_rules({"rule": [{"at": "residual-add", "attn": "tests.attention_helpers:ChannelScale",
                                   "include": ["layer4.0"]}]})
    (row,) = get_report(retrofit.retrofit(cached("resnet18"), rules=rules, input_size=64)).rows
    parent, _, leaf = row.module.rpartition(".")
    assert parent == "layer4.0" and leaf.isidentifier(), row.module


@pytest.mark.parametrize(
    "spec,message",
    [
        ("tests.no_such_module:Gate", r"cannot import module 'tests.no_such_module' .*on PYTHONPATH\?"),
        ("tests.attention_helpers:Missing", r"module 'tests.attention_helpers' has no 'Missing' "
                                            r"\(its nn.Module classes: ChannelScale, NotIdentity\)"),
        ("tests.attention_helpers:NotAModule", r"NotAModule is a type, not an nn.Module subclass"),
        ("tests.attention_helpers:NOT_A_CLASS", r"NOT_A_CLASS is a int, not an nn.Module subclass"),
        ("tests.attention_helpers:", r"write an imported class as 'package.module:ClassName'"),
    ],
)
@pytest.mark.usefixtures("user_types")
def test_imported_class_errors(spec: str, message: str) -> None:
    with pytest.raises(AttentionError, match=rf"attention '{spec}': {message}"):
        get_attention(spec)


@pytest.mark.usefixtures("user_types")
def test_imported_class_error_names_the_rule(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "tests.attention_helpers:Missing"\n')
    with pytest.raises(RuleError, match=r"rules.toml, rule 1: attention 'tests.attention_helpers:Missing': module"):
        load_rules(path)


def test_unknown_attention_mentions_the_import_form() -> None:
    with pytest.raises(AttentionError, match=r"or a class as 'package.module:ClassName'\)"):
        get_attention("no_such_attention")


# ---- identity_error -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["se", "eca", "cbam", *NEW])
def test_identity_error_is_zero_for_builtins(name: str) -> None:
    assert identity_error(create_attention(name, 16), 16) == 0.0


def test_identity_error_catches_a_non_identity_module() -> None:
    assert identity_error(NotIdentity(4), 4) == pytest.approx(1.0)
    assert identity_error(create_attention("se", 16, gate="sigmoid"), 16) > 0.0


class _WithBatchNorm(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


def test_identity_error_restores_modes_buffers_and_random_state() -> None:
    m = _WithBatchNorm(4).eval()
    m.norm.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    state = torch.random.get_rng_state()
    assert identity_error(m, 4, size=(3, 3)) > 0.0
    assert not m.training and m.norm.training
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_identity_error_wrong_shape_and_failure() -> None:
    assert identity_error(nn.AdaptiveAvgPool2d(1), 4) == math.inf
    with pytest.raises(AttentionError, match=r"Conv2d failed on a \(2, 4, 7, 5\) torch.float32 probe in train mode"):
        identity_error(nn.Conv2d(3, 3, 1), 4)


def test_non_identity_module_is_refused_unless_opted_out() -> None:
    from torch import nn


    @retrofit.register_attention("test_not_identity")
    class NotIdentity(nn.Module):
        def __init__(self, channels: int, gate: str = "identity", device=None, dtype=None) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 1, device=device, dtype=dtype)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.sigmoid(self.conv(x))

    try:
        model = cached("resnet18")
        with pytest.raises(retrofit.AttentionError,
                           match=r"attention 'test_not_identity' \(NotIdentity\) at site 'layer1.0.add' is not an "
                                 r"identity at init: max \|out - in\| = .* make its reset_parameters\(\) start it at "
                                 r"identity, use gate='sigmoid', or pass check_identity=False"):
            retrofit.retrofit(model, "test_not_identity", input_size=64)
        gm = retrofit.retrofit(model, "test_not_identity", input_size=64, check_identity=False)
        assert retrofit.get_report(gm).identity_ok is False
    finally:
        if "test_not_identity" in retrofit.list_attention():
            retrofit.attention.unregister_attention("test_not_identity")
