"""timm's attention names (ese, ecam, ceca, gca, lcbam, scoord, ela, strip): timm's weights
load into each, the paper form equals timm's module in float64, exact identity at init,
gradients within two steps, exact parameter counts, site constraints, and every place the
other types go (both forms, save and load, ONNX, torch.compile, the zoo sample)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from timm.layers import create_attn
from torch import nn

import retrofit
from retrofit import AttentionError, create_attention, get_attention, get_report, list_attention
from retrofit.attention import eca_kernel_size, gate_methods, zero_init_params
from retrofit.fuse import gated_residual
from retrofit.rulefile import builtin_rules_dir, parse_rules

from .checks import assert_compiles_like_eager, assert_every_parameter_learns, assert_onnx_matches
from .conftest import cached
from .test_fuse import TinyResNet
from .test_zoo import SLICE, zoo_sweep

TIMM = ["ese", "ecam", "ceca", "gca", "lcbam", "scoord", "ela", "strip"]
ADDITIVE = ["gca"]  # x + f(x): one form, no sigmoid gate

# The same module in both libraries: (name, retrofit's arguments, timm's arguments).
PAIRS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("ese", {}, {}),
    ("ese", {"add_maxpool": True}, {"add_maxpool": True}),
    ("ecam", {}, {}),
    ("ecam", {"rd_channels": 4, "act_layer": "silu"}, {"rd_channels": 4, "act_layer": nn.SiLU}),
    ("ceca", {}, {}),
    ("ceca", {"bias": True}, {"act_layer": nn.ReLU}),  # timm's act_layer only switches the bias on
    ("gca", {}, {}),
    ("gca", {"use_attn": False, "rd_ratio": 0.25}, {"use_attn": False, "rd_ratio": 0.25}),
    ("lcbam", {}, {}),
    ("lcbam", {"mlp_bias": True, "spatial_kernel_size": 3}, {"mlp_bias": True, "spatial_kernel_size": 3}),
    ("scoord", {}, {}),
    ("scoord", {"se_factor": 1.0, "bias": False}, {"se_factor": 1.0, "bias": False}),
    ("ela", {}, {}),
    ("ela", {"norm_groups": None, "kernel_size": 5, "bias": True}, {"norm_layer": None, "kernel_size": 5, "bias": True}),
    ("ela", {"norm_groups": 4}, {"norm_layer": functools.partial(nn.GroupNorm, 4)}),
    ("strip", {}, {}),
    ("strip", {"kernel_size": 5, "bias": True}, {"kernel_size": 5, "bias": True}),
    ("strip", {"use_conv": False}, {"use_conv": False}),
]
# Variants with an identity form, at any channel count.
VARIANTS = [(n, a) for n, a, _ in PAIRS if a != {"use_conv": False} and a.get("norm_groups") != 4]


def vid(v: tuple[Any, ...]) -> str:
    return v[0] + "".join(f"-{k}={val}" for k, val in v[1].items())


def paper_gate(name: str) -> str:
    return "identity" if name in ADDITIVE else "sigmoid"


def randomized(m: nn.Module) -> nn.Module:
    """Every parameter and BatchNorm statistic drawn at random, as trained weights would be."""
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for n, b in m.named_buffers():
            if n.endswith("running_mean"):
                b.copy_(torch.randn_like(b))
            elif n.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return m


def perturbed(name: str, channels: int, **args: Any) -> nn.Module:
    """The module with every parameter moved off its init, so it is no identity."""
    torch.manual_seed(0)
    m = create_attention(name, channels, **args)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---- timm's module is the oracle -------------------------------------------------------------


def max_diff_to_timm(name: str, args: dict[str, Any], timm_args: dict[str, Any], channels: int) -> float:
    """Largest |retrofit - timm| in float64 over train and eval mode, two sizes, timm's
    weights (drawn at random) loaded into retrofit's module, strictly."""
    torch.manual_seed(channels)
    theirs = randomized(create_attn(name, channels, **timm_args).double())
    ours = create_attention(name, channels, gate=paper_gate(name), dtype=torch.float64, **args)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    worst = 0.0
    for size in [(7, 5), (1, 3)]:
        x = torch.randn(3, channels, *size, dtype=torch.float64) * 2
        for train in (True, False):
            with torch.no_grad():
                worst = max(worst, (ours.train(train)(x) - theirs.train(train)(x)).abs().max().item())
    return worst


@pytest.mark.parametrize("pair", PAIRS, ids=vid)
@pytest.mark.parametrize("channels", [20, 200])
def test_paper_form_equals_timms_module_with_its_weights(pair: tuple[Any, ...], channels: int) -> None:
    name, args, timm_args = pair
    assert max_diff_to_timm(name, args, timm_args, channels) <= 1e-12


@pytest.mark.parametrize("name", TIMM)
def test_default_arguments_are_timms(name: str) -> None:
    """Built with no arguments, both libraries make the same layers (same state-dict shapes)."""
    for channels in (3, 64, 960):
        ours = create_attention(name, channels, gate=paper_gate(name)).state_dict()
        theirs = create_attn(name, channels).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, channels


# ---- identity at init ----------------------------------------------------------------------


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
    # BatchNorm in train mode needs two values per map, as the host model's own does
    assume(not (name == "lcbam" and train and batch * h * w == 1))
    # a site the type refuses (ELA's GroupNorm over a one-value strip) is skipped by the planner
    assume(getattr(get_attention(name), "site_problem", lambda *a, **k: None)(channels, (h, w), **args) is None)
    torch.manual_seed(channels * 100 + h * 10 + w)
    m = create_attention(name, channels, **args).train(train)
    x = torch.randn(batch, channels, h, w) * scale
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("name", TIMM)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_identity_is_exact_in_other_dtypes(name: str, dtype: torch.dtype) -> None:
    m = create_attention(name, 16, dtype=dtype)
    x = torch.randn(2, 16, 5, 7, dtype=dtype)
    assert torch.equal(m(x), x) and torch.equal(m.eval()(x), x)
    assert all(p.dtype == dtype for p in m.parameters())


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_reset_parameters_restores_identity(variant: tuple[str, dict[str, Any]]) -> None:
    name, args = variant
    x = torch.randn(2, 8, 5, 3)
    m = perturbed(name, 8, **args)
    assert not torch.equal(m(x), x)
    m.reset_parameters()
    assert torch.equal(m(x), x)
    assert zero_init_params(m)  # what identity rests on, and what score_sites measures


@pytest.mark.parametrize("name", TIMM)
def test_identity_error_is_zero(name: str) -> None:
    assert retrofit.attention.identity_error(create_attention(name, 16), 16) == 0.0


# ---- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_every_parameter_gets_gradient_within_two_steps(variant: tuple[str, dict[str, Any]]) -> None:
    name, args = variant
    torch.manual_seed(0)
    m = create_attention(name, 32, **args)
    assert_every_parameter_learns(m, 32)


# ---- gate forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in TIMM if n not in ADDITIVE])
def test_sigmoid_gate_changes_output(name: str) -> None:
    torch.manual_seed(0)
    m = create_attention(name, 16, gate="sigmoid")
    x = torch.randn(2, 16, 5, 5)
    y = m(x)
    assert y.shape == x.shape and not torch.equal(y, x)


def test_gca_has_no_sigmoid_gate() -> None:
    with pytest.raises(AttentionError, match=r"attention 'gca' has no sigmoid gate: .* use gate='identity', or "
                                             r"attn='gc' with fuse_scale=True for a scale fusion"):
        create_attention("gca", 16, gate="sigmoid")


def test_ese_gates_with_the_hard_sigmoid() -> None:
    """The paper form is relu6(z + 3) / 6; the identity form twice that, 1.0 at z == 0."""
    torch.manual_seed(0)
    m = create_attention("ese", 8, gate="sigmoid")
    x = torch.randn(2, 8, 5, 5)
    z = m.fc(x.mean((2, 3), keepdim=True))
    assert torch.equal(m.scale(x), F.relu6(z + 3) / 6)
    ident = create_attention("ese", 8)
    ident.load_state_dict(m.state_dict())
    assert torch.equal(ident.scale(x), 2 * (F.relu6(z + 3) / 6))


def test_ceca_pads_circularly() -> None:
    """The first channel's gate sees the last channel: a kernel tap on it changes the gate."""
    m = create_attention("ceca", 8, kernel_size=3, gate="sigmoid")
    with torch.no_grad():
        m.conv.weight.copy_(torch.tensor([[[1.0, 0.0, 0.0]]]))  # each gate reads the channel before it
    x = torch.arange(8.0).view(1, 8, 1, 1).expand(1, 8, 2, 2)
    assert torch.equal(m.scale(x).flatten(), torch.sigmoid(torch.tensor([7.0, 0, 1, 2, 3, 4, 5, 6])))


# ---- parameter counts ----------------------------------------------------------------------


def divisible(v: float, divisor: int, round_limit: float) -> int:
    """timm's make_divisible, written out."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < round_limit * v else new


CLOSED_FORM = {
    "ese": lambda c: c * c + c,  # one biased C -> C 1x1 convolution
    # conv: 1 -> rd (kernel 1, biased); conv2: rd -> 1 (kernel k, biased)
    "ecam": lambda c: 2 * divisible(c / 8, 8, 0.9) + divisible(c / 8, 8, 0.9) * eca_kernel_size(c) + 1,
    "ceca": lambda c: eca_kernel_size(c),  # one unbiased 1-D kernel
    # score conv (C -> 1, biased), fc1 (biased), LayerNorm, fc2 (biased); width C / 8
    "gca": lambda c: (c + 1) + 2 * (c * divisible(c / 8, 1, 0)) + 3 * divisible(c / 8, 1, 0) + c,
    # unbiased MLP of width C / 16; a 1 -> 1 7x7 convolution, unbiased, and its BatchNorm
    "lcbam": lambda c: 2 * c * divisible(c / 16, 1, 0) + 7 * 7 + 2,
    # fc1, fc_h, fc_w (biased) at width C / 4 * 2 / 3, a multiple of 8
    "scoord": lambda c: 3 * c * divisible(c * 0.25 * 2 / 3, 8, 0) + divisible(c * 0.25 * 2 / 3, 8, 0) + 2 * c,
    "ela": lambda c: 2 * 7 * c + 2 * 2 * c,  # two depthwise 7-tap convolutions, two GroupNorms
    "strip": lambda c: 2 * 3 * c,  # two depthwise 3-tap convolutions
}


@pytest.mark.parametrize("name", TIMM)
@pytest.mark.parametrize("channels", [1, 3, 7, 64, 256, 2048])
def test_parameter_count_closed_form(name: str, channels: int) -> None:
    want = CLOSED_FORM[name](channels)
    for gate in ["identity"] if name in ADDITIVE else ["identity", "sigmoid"]:
        assert n_params(create_attention(name, channels, gate=gate)) == want
    assert n_params(create_attn(name, channels)) == want  # timm's module, the same


# ---- shapes and fused gates ------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("size", [(7, 7), (1, 1), (7, 5), (2, 9)])
def test_odd_shapes(variant: tuple[str, dict[str, Any]], size: tuple[int, int]) -> None:
    name, args = variant
    for channels in (1, 3):
        m = perturbed(name, channels, **args)
        x = torch.randn(2, channels, *size)
        for train in (True, False):
            y = m.train(train)(x)
            assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v[0] not in ADDITIVE], ids=vid)
def test_declared_fused_gates_match_forward(variant: tuple[str, dict[str, Any]]) -> None:
    """``fused_gates`` promises forward is that chain of products; the rewrite relies on it."""
    name, args = variant
    m = perturbed(name, 8, **args).eval()
    x, shortcut = torch.randn(2, 8, 7, 5), torch.randn(2, 8, 7, 5)
    methods = gate_methods(m)
    assert methods == (("channel_scale", "spatial_scale") if name == "lcbam" else ("scale",))
    y = x
    for method in methods:
        y = y * getattr(m, method)(y)
    assert torch.equal(m(x), y)
    torch.testing.assert_close(gated_residual(m, x, shortcut), m(x) + shortcut)


def test_gca_is_no_product_of_gates() -> None:
    m = perturbed("gca", 8)
    x = torch.randn(2, 8, 7, 5)
    assert gate_methods(m) is None
    assert torch.equal(m(x), x + m.delta(x))


def test_directional_gates_follow_rows_and_columns() -> None:
    a_h, a_w = perturbed("ela", 4).gates(torch.randn(2, 4, 7, 5))
    assert a_h.shape == (2, 4, 7, 1) and a_w.shape == (2, 4, 1, 5)


# ---- arguments and constraints ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("ecam", {"kernel_size": 4}, r"ecam: kernel_size = 4 is not valid: an odd integer >= 1"),
        ("ecam", {"rd_ratio": 0}, r"ecam: rd_ratio = 0 is not valid: it is the bottleneck width as a fraction"),
        ("ceca", {"kernel_size": 41}, r"ceca: kernel_size = 41 pads 20 channels circularly on each side, more than "
                                      r"the 16 there are; give kernel_size <= 33 or leave it out \(adaptive\)"),
        ("gca", {"act_layer": "no_such_act"}, r"gca: unknown activation act_layer = 'no_such_act'; give a timm"),
        ("lcbam", {"spatial_kernel_size": 4}, r"lcbam: spatial_kernel_size = 4 is not valid: an odd integer"),
        ("scoord", {"se_factor": 0}, r"scoord: se_factor = 0 is not valid: a number > 0"),
        ("ela", {"norm_groups": 3}, r"ela: 16 channels are not divisible by norm_groups = 3 \(the GroupNorm's "
                                    r"groups\); give norm_groups a divisor of the channels \(1 always fits\)"),
        ("ela", {"norm_groups": 0}, r"ela: norm_groups = 0 is not valid: an integer >= 1 that divides the channels"),
        ("ela", {"kernel_size": 6}, r"ela: kernel_size = 6 is not valid: an odd integer >= 1"),
        ("ela", {"act_layer": nn.Sigmoid}, r"ela: act_layer Sigmoid maps 0 to 0.5, so the identity form cannot "
                                           r"start its gates at 1.0; use an activation with f\(0\) = 0"),
        ("strip", {"use_conv": False}, r"strip: use_conv=False has no parameters, so nothing can start its gate "
                                       r"at 1.0; use use_conv=True for the identity form, or gate='sigmoid'"),
        ("strip", {"kernel_size": 2}, r"strip: kernel_size = 2 is not valid: an odd integer >= 1"),
    ],
)
def test_invalid_arguments(name: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(AttentionError, match=message):
        create_attention(name, 16, **args)


def test_paper_form_takes_any_activation() -> None:
    """The check of f(0) = 0 is the identity form's: timm's module takes any activation."""
    m = create_attention("ela", 16, act_layer=nn.Sigmoid, gate="sigmoid")
    assert isinstance(m.act, nn.Sigmoid)


def test_types_with_constraints_say_them() -> None:
    assert get_attention("ela").constraints == "channels divisible by norm_groups (GroupNorm groups; 1 by default)"
    assert get_attention("ceca").constraints.startswith("with an explicit kernel_size, at least (kernel_size - 1)")
    assert all(not hasattr(get_attention(n), "constraints") for n in TIMM if n not in ("ela", "ceca"))


def test_a_site_ela_cannot_take_is_skipped_with_its_reason() -> None:
    """norm_groups = 128 divides 128, 256 and 512 channels but not layer1's 64."""
    model = cached("resnet18")
    plan = retrofit.plan(model, "ela", attn_args={"norm_groups": 128}, input_size=64)
    assert [p.site.path for p in plan.placements] == [f"layer{s}.{b}" for s in (2, 3, 4) for b in (0, 1)]
    why = ("ela: 64 channels are not divisible by norm_groups = 128 (the GroupNorm's groups); give norm_groups "
           "a divisor of the channels (1 always fits) (built-in 'ela', rule 1)")
    assert [(s.path, reason) for s, reason in plan.skipped] == [("layer1.0", why), ("layer1.1", why)]
    report = get_report(retrofit.retrofit(model, "ela", attn_args={"norm_groups": 128}, input_size=64))
    assert len(report.rows) == 6 and report.max_abs_diff == 0.0


def test_a_site_too_narrow_for_a_circular_kernel_is_skipped() -> None:
    plan = retrofit.plan(cached("resnet18"), "ceca", attn_args={"kernel_size": 131}, input_size=64)
    assert len(plan.placements) == 6
    assert [s.path for s, _ in plan.skipped] == ["layer1.0", "layer1.1"]
    assert plan.skipped[0][1].startswith("ceca: kernel_size = 131 pads 65 channels circularly on each side, more "
                                         "than the 64 there are")


# ---- on a real model, in both forms ----------------------------------------------------------

BLOCKS = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
ONE_PER_BLOCK = parse_rules({"rule": [{"at": "residual-add", "attn": name, "include": [block]}
                                      for name, block in zip(TIMM, BLOCKS, strict=True)]})


def one_per_block(keep_class: bool, input_size: int = 64) -> nn.Module:
    """resnet18 with each type on one residual branch (ese on layer1.0, ..., strip on layer4.1)."""
    model = retrofit.retrofit(cached("resnet18"), rules=ONE_PER_BLOCK, input_size=input_size, keep_class=keep_class)
    assert [(r.attn, r.path) for r in get_report(model).rows] == list(zip(TIMM, BLOCKS, strict=True))
    return model


def moved(model: nn.Module) -> nn.Module:
    """Every inserted parameter moved off its init, as fine-tuning would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for row in get_report(model).rows:
            for p in model.get_submodule(row.module).parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("keep_class", [False, True], ids=["graph-module", "keep-class"])
def test_exact_identity_on_a_real_model(keep_class: bool) -> None:
    model = one_per_block(keep_class)
    assert get_report(model).max_abs_diff == 0.0  # eval mode, from the report
    reference = copy.deepcopy(cached("resnet18")).train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.train()(x), reference(x))  # train mode: batch statistics, same outputs
    if keep_class:
        assert type(model) is type(cached("resnet18"))


@pytest.mark.parametrize("name", TIMM)
def test_builtin_rules_are_an_exact_identity(name: str) -> None:
    gm = retrofit.retrofit(cached("resnet18"), rules=builtin_rules_dir() / f"{name}.toml", input_size=64)
    report = get_report(gm)
    assert {r.attn for r in report.rows} == {name} and len(report.rows) == 8 and report.max_abs_diff == 0.0
    assert retrofit.list_builtin_rules()[name]


@pytest.mark.parametrize("keep_class", [False, True], ids=["graph-module", "keep-class"])
def test_save_and_load_round_trip(tmp_path: Path, keep_class: bool) -> None:
    model = moved(one_per_block(keep_class))
    loaded = retrofit.load(retrofit.save(model, tmp_path / "m.safetensors"))
    assert model.state_dict().keys() == loaded.state_dict().keys()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


STACKED = parse_rules({"rule": [{"at": "residual-add", "attn": name, "conflict": "stack"} for name in TIMM]})


@pytest.mark.parametrize("keep_class", [False, True], ids=["graph-module", "keep-class"])
def test_compile_fullgraph_and_onnx(keep_class: bool) -> None:
    """Every type, stacked on both blocks of a small model, compiles whole (aot_eager, forward
    and backward) and exports to ONNX that onnxruntime runs alike."""
    torch.manual_seed(0)
    model = moved(retrofit.retrofit(TinyResNet(), rules=STACKED, input_size=16, keep_class=keep_class))
    assert [r.attn for r in get_report(model).rows] == TIMM + TIMM
    if not keep_class:  # the last module before the add that is not in place fuses its gate into it
        assert [str(n.args[0].target) for n in model.graph.nodes if n.target is gated_residual] == ["block.strip"]
    x = torch.randn(2, 3, 16, 16)
    assert_compiles_like_eager(model, x, atol=1e-5)
    assert_onnx_matches(model, x)


def test_listed_and_described() -> None:
    assert set(TIMM) <= set(list_attention())
    for name in TIMM:
        summary = (get_attention(name).__doc__ or "").strip().splitlines()[0]
        assert summary and len(summary) < 100, name


# ---- the zoo sample ----------------------------------------------------------------------------


@pytest.mark.examples  # the sweep's slice of the zoo, as CI's examples run (keeps the default run short)
@pytest.mark.parametrize("keep_class", [False, True], ids=["graph-module", "keep-class"])
@pytest.mark.parametrize("source,name", SLICE)
def test_zoo_sample(monkeypatch: pytest.MonkeyPatch, source: str, name: str, keep_class: bool) -> None:
    """The sweep's check (scripts/zoo_sweep.py), one rewrite per type, on the slice of models
    the built-in types pass: identity at init in eval mode (the sweep's tolerance), backward
    reaching every new parameter, the parameter delta equal to the closed form at every site,
    the model's tensors and modes untouched, and with keep_class every unit kept with its class."""
    # the sweep's closed forms cover se, eca and cbam; these types' are above
    monkeypatch.setattr(zoo_sweep, "closed_form", lambda attn, c: CLOSED_FORM[attn](c))
    row = zoo_sweep.structure(source, name)
    if row["status"] == "pending":
        row.update(zoo_sweep.real_check(source, name, 64, keep_class=keep_class, attns=tuple(TIMM)))
    assert row["status"] in ("ok", "no sites"), row
    if row["status"] == "ok":
        assert all(row[f"{a}_sites"] > 0 and row[f"{a}_diff"] <= 1e-5 for a in TIMM), row


def test_ela_refuses_a_site_whose_groupnorm_would_see_one_value() -> None:
    ela = get_attention("ela")
    assert ela.site_problem(1, (1, 5)) == (
        "a 1x5 map with 1 channel(s) per GroupNorm group leaves one value to normalise in a strip (GroupNorm "
        "needs two); give norm_groups=None")
    assert ela.site_problem(1, (2, 2)) is None and ela.site_problem(16, (1, 1)) is None
    assert ela.site_problem(1, (1, 1), norm_groups=None) is None
    with pytest.raises(ValueError, match="more than 1 value"):  # what the site would otherwise do
        create_attention("ela", 1)(torch.randn(1, 1, 1, 5))
