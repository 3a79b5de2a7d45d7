"""The attention types of YOLO practice: ema, gam, shuffle, triplet, bam, scse, lska, mlca,
sge and polarized.

Each against its authors' code (or, for GAM, which has none, the paper's equations) with
the same weights in float64; exact identity at init; every parameter reached within two
steps; exact parameter counts; constraints as skipped sites, never errors mid-rewrite; and
everywhere a built-in type goes: both model forms, fused adds, save and load, gate
records, ONNX in onnxruntime and torch.compile.

The references below are written from the official code's structure and operations
(github.com/YOLOonMe/EMA-attention-module, wofmanaf/SA-Net, landskape-ai/triplet-attention,
Jongchan/attention-module, StevenLauHKHK/Large-Separable-Kernel-Attention,
wandahangFY/MLCA, implus/PytorchInsight, DeLightCMU/PSA) or, for scSE, are the installed
segmentation_models_pytorch module itself; they use the official layer names, so loading
their state dicts into the library's modules also checks the keys.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import retrofit
from retrofit import AttentionError, create_attention, get_attention, get_report
from retrofit.attention import LSKA_KERNELS, mlca_kernel_size
from retrofit.cli import main as cli_main
from retrofit.fuse import gate_methods, gated_residual
from retrofit.gates import record_gates
from retrofit.rulefile import builtin_rules_dir, parse_rules

from .checks import assert_compiles_like_eager, assert_every_parameter_learns, assert_onnx_matches
from .conftest import cached

NAMES = ["ema", "gam", "shuffle", "triplet", "bam", "scse", "lska", "mlca", "sge", "polarized"]
CONSTRAINED = ["ema", "gam", "shuffle", "bam", "scse", "lska", "sge", "polarized"]

# Every variant worth proving (identity forms: shuffle=True is the paper's permutation).
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("ema", {}),
    ("ema", {"factor": 4}),
    ("gam", {}),
    ("gam", {"groups": 4}),
    ("shuffle", {"groups": 4}),
    ("shuffle", {}),
    ("triplet", {}),
    ("triplet", {"no_spatial": True}),
    ("bam", {}),
    ("bam", {"dilation_conv_num": 1, "dilation_val": 2}),
    ("scse", {}),
    ("lska", {}),
    ("lska", {"kernel_size": 23}),
    ("mlca", {}),
    ("mlca", {"local_size": 3, "local_weight": 0.3}),
    ("sge", {"groups": 4}),
    ("sge", {}),
    ("polarized", {}),
    ("polarized", {"layout": "sequential"}),
]


def vid(v: tuple[str, dict[str, Any]]) -> str:
    name, args = v
    return name + "".join(f"-{k}={val}" for k, val in args.items())


def fits(name: str, channels: int, args: dict[str, Any]) -> bool:
    check = getattr(get_attention(name), "site_problem", None)
    return check is None or check(channels, (1, 1), **args) is None


def channels_for(name: str, args: dict[str, Any], wanted: tuple[int, ...] = (4, 8, 16, 32, 64, 128)) -> int:
    """The first channel count in ``wanted`` the variant can take."""
    return next(c for c in wanted if fits(name, c, args))


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def perturbed(name: str, channels: int, dtype: torch.dtype = torch.float32, **args: Any) -> nn.Module:
    """The module with every parameter moved off its init (norm scales kept positive)."""
    torch.manual_seed(0)
    m = create_attention(name, channels, dtype=dtype, **args)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---- identity at init ---------------------------------------------------------------------


@given(
    variant=st.sampled_from(VARIANTS),
    channels=st.sampled_from([1, 2, 3, 8, 16, 32, 64, 128]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    batch=st.integers(1, 2),
    train=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
@settings(max_examples=80, deadline=None)
def test_identity_is_exact_for_any_input(variant, channels, h, w, batch, train, scale) -> None:
    name, args = variant
    if not fits(name, channels, args):
        with pytest.raises(AttentionError, match=rf"^{name}: "):
            create_attention(name, channels, **args)
        return
    torch.manual_seed(channels * 100 + h * 10 + w)
    m = create_attention(name, channels, **args).train(train)
    x = torch.randn(batch, channels, h, w) * scale
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_identity_is_exact_in_other_dtypes(variant: tuple[str, dict[str, Any]], dtype: torch.dtype) -> None:
    name, args = variant
    c = channels_for(name, args)
    m = create_attention(name, c, dtype=dtype, **args)
    x = torch.randn(2, c, 5, 7, dtype=dtype)
    assert torch.equal(m(x), x)
    assert all(p.dtype == dtype for p in m.parameters())


def test_reset_parameters_restores_identity() -> None:
    for name, args in VARIANTS:
        c = channels_for(name, args)
        x = torch.randn(2, c, 5, 3)
        m = perturbed(name, c, **args)
        assert not torch.equal(m(x), x), name
        m.reset_parameters()
        assert torch.equal(m(x), x), name


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_sigmoid_form_is_no_identity(variant: tuple[str, dict[str, Any]]) -> None:
    name, args = variant
    c = channels_for(name, args)
    torch.manual_seed(0)
    m = create_attention(name, c, gate="sigmoid", **args)
    x = torch.randn(2, c, 6, 5)
    y = m(x)
    assert y.shape == x.shape and not torch.equal(y, x)


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_every_parameter_gets_gradient_within_two_steps(variant: tuple[str, dict[str, Any]]) -> None:
    name, args = variant
    c = 128  # every bottleneck at least 8 wide: a narrower one may start with all its ReLUs off
    torch.manual_seed(0)
    m = create_attention(name, c, **args)
    assert_every_parameter_learns(m, c)


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("size", [(1, 1), (2, 9), (7, 5)])
def test_odd_shapes_stay_finite(variant: tuple[str, dict[str, Any]], size: tuple[int, int]) -> None:
    name, args = variant
    c = channels_for(name, args, (1, 2, 3, 8, 16, 64, 128))
    x = torch.randn(2, c, *size)
    for gate in ("identity", "sigmoid"):
        m = perturbed(name, c, gate=gate, **args)
        for train in (True, False):
            y = m.train(train)(x)
            assert y.shape == x.shape and torch.isfinite(y).all(), (gate, train)


# ---- parameter counts, from the papers' layer shapes -------------------------------------


def ema_params(c: int, factor: int = 32) -> int:
    w = c // factor
    return 2 * w + (w * w + w) + (9 * w * w + w)  # GroupNorm, 1x1, 3x3 (biased)


def gam_params(c: int, groups: int = 1) -> int:
    r = c // 4
    mlp = (c * r + r) + (r * c + c)
    spatial = (r * (c // groups) * 49 + r) + (c * (r // groups) * 49 + c)
    return mlp + spatial


def shuffle_params(c: int, groups: int = 64) -> int:
    return 6 * (c // (2 * groups))  # two weights, two biases and the GroupNorm's pair per channel of a half


def triplet_params(c: int, no_spatial: bool = False) -> int:
    return (2 if no_spatial else 3) * (2 * 7 * 7 + 1)


def bam_params(c: int, dilation_conv_num: int = 2, dilation_val: int = 4) -> int:
    r = c // 16
    mlp = (c * r + r) + (r * c + c)
    spatial = (c * r + r) + dilation_conv_num * (9 * r * r + r) + (r + 1)
    return mlp + spatial


def scse_params(c: int) -> int:
    r = c // 16
    return (c * r + r) + (r * c + c) + (c + 1)


def lska_params(c: int, kernel_size: int = 7) -> int:
    k0, k1, _ = {7: (3, 3, 2), 23: (5, 7, 3)}[kernel_size]
    return 2 * (c * k0 + c) + 2 * (c * k1 + c) + (c * c + c)


def mlca_params(c: int, **_: Any) -> int:
    return 2 * mlca_kernel_size(c)


def sge_params(c: int, groups: int = 64) -> int:
    return 2 * groups


def polarized_params(c: int, layout: str = "parallel") -> int:
    i = c // 2
    branches = c + c * i + 2 * c * i  # q_right, v_right, q_left and v_left (no biases)
    if layout == "parallel":
        up = i * c
    else:
        j = i // 4
        up = (i * j + j) + 2 * j + (j * c + c)  # conv, LayerNorm, conv
    return branches + up + c  # and alpha


CLOSED_FORM = {"ema": ema_params, "gam": gam_params, "shuffle": shuffle_params, "triplet": triplet_params,
               "bam": bam_params, "scse": scse_params, "lska": lska_params, "mlca": mlca_params, "sge": sge_params,
               "polarized": polarized_params}


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
@pytest.mark.parametrize("channels", [16, 64, 256, 2048])
def test_parameter_count_closed_form(variant: tuple[str, dict[str, Any]], channels: int) -> None:
    name, args = variant
    if not fits(name, channels, args):
        return
    want = CLOSED_FORM[name](channels, **args)
    for gate in ("identity", "sigmoid"):
        assert n_params(create_attention(name, channels, gate=gate, device="meta", **args)) == want


def test_mlca_kernel_is_the_official_codes() -> None:
    """ECA's formula without ECA's floor of 3: kernel 1 below 8 channels."""
    assert [mlca_kernel_size(c) for c in (1, 4, 7, 8, 64, 255, 256, 1024)] == [1, 1, 1, 3, 3, 5, 5, 5]
    assert create_attention("mlca", 8, kernel_size=5).conv.kernel_size == (5,)


def test_gam_on_resnet50_grouped_and_not() -> None:
    """What the docstring and the rule file say: ungrouped GAM adds about 500 million
    parameters to a ResNet-50; grouped by 4 (the built-in rule set), a quarter of its spatial
    branch."""
    plan = retrofit.plan(cached("resnet50"), "gam", input_size=64)
    channels = [p.channels for p in plan.placements]
    assert channels == [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert {dict(p.args)["groups"] for p in plan.placements} == {4}
    assert sum(gam_params(c) for c in channels) == pytest.approx(503e6, rel=0.01)
    assert sum(gam_params(c, 4) for c in channels) == pytest.approx(133e6, rel=0.01)


# ---- the official code, same weights, float64 -----------------------------------------------


def _bn_eval(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Trained-like statistics and scales, eval mode."""
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
    bn.eval()


def _folded(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer followed by BatchNorm in eval mode, as one layer: its weight and bias."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = torch.zeros_like(bn.running_mean) if bias is None else bias
    return weight * s.reshape(-1, *([1] * (weight.ndim - 1))), (b - bn.running_mean) * s + bn.bias


def _randomise(module: nn.Module, scale: float = 0.3) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def _inputs(channels: int, sizes: tuple[tuple[int, int], ...] = ((7, 7), (6, 9), (13, 11))) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(2, channels, *s, generator=gen, dtype=torch.float64) for s in sizes]


class _EmaOfficial(nn.Module):
    """EMA as the official ``EMA`` class computes it (adaptive pools, permutes, matmuls)."""

    def __init__(self, channels: int, factor: int = 32) -> None:
        super().__init__()
        self.groups = factor
        self.gn = nn.GroupNorm(channels // factor, channels // factor)
        self.conv1x1 = nn.Conv2d(channels // factor, channels // factor, 1)
        self.conv3x3 = nn.Conv2d(channels // factor, channels // factor, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        group_x = x.reshape(b * self.groups, -1, h, w)
        x_h = F.adaptive_avg_pool2d(group_x, (h, 1))
        x_w = F.adaptive_avg_pool2d(group_x, (1, w)).permute(0, 1, 3, 2)
        hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))
        x_h, x_w = torch.split(hw, [h, w], dim=2)
        x1 = self.gn(group_x * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())
        x2 = self.conv3x3(group_x)
        x11 = torch.softmax(F.adaptive_avg_pool2d(x1, 1).reshape(b * self.groups, -1, 1).permute(0, 2, 1), -1)
        x12 = x2.reshape(b * self.groups, c // self.groups, -1)
        x21 = torch.softmax(F.adaptive_avg_pool2d(x2, 1).reshape(b * self.groups, -1, 1).permute(0, 2, 1), -1)
        x22 = x1.reshape(b * self.groups, c // self.groups, -1)
        weights = (torch.matmul(x11, x12) + torch.matmul(x21, x22)).reshape(b * self.groups, 1, h, w)
        return (group_x * weights.sigmoid()).reshape(b, c, h, w)


@pytest.mark.parametrize("factor", [32, 8])
def test_ema_is_the_official_code(factor: int) -> None:
    ref = _randomise(_EmaOfficial(64, factor)).double()
    ours = create_attention("ema", 64, factor=factor, gate="sigmoid", dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert max(max_diff(ours(x), ref(x)) for x in _inputs(64)) <= 1e-12


class _GamPaper(nn.Module):
    """GAM from the paper's figures: a per-position channel MLP and sigmoid, then conv 7x7,
    BN, ReLU, conv 7x7, BN, sigmoid; grouped with the gate channel-shuffled for groups > 1."""

    def __init__(self, c: int, rate: int = 4, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups
        self.mlp = nn.Sequential(nn.Linear(c, c // rate), nn.ReLU(), nn.Linear(c // rate, c))
        self.conv1 = nn.Conv2d(c, c // rate, 7, padding=3, groups=groups)
        self.bn1 = nn.BatchNorm2d(c // rate)
        self.conv2 = nn.Conv2d(c // rate, c, 7, padding=3, groups=groups)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        att = self.mlp(x.permute(0, 2, 3, 1).reshape(b, -1, c)).reshape(b, h, w, c).permute(0, 3, 1, 2)
        x = x * att.sigmoid()
        s = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))).sigmoid()
        if self.groups > 1:  # channel_shuffle(s, groups): (B, g, C/g, H, W) -> (B, C/g, g, H, W)
            s = s.reshape(b, self.groups, c // self.groups, h, w).permute(0, 2, 1, 3, 4).reshape(b, c, h, w)
        return x * s


@pytest.mark.parametrize("groups", [1, 4])
def test_gam_is_the_papers_equations_with_batchnorm_folded(groups: int) -> None:
    ref = _randomise(_GamPaper(32, groups=groups)).double()
    _bn_eval(ref.bn1), _bn_eval(ref.bn2)
    ours = create_attention("gam", 32, groups=groups, gate="sigmoid", dtype=torch.float64)
    with torch.no_grad():
        ours.fc1.load_state_dict(ref.mlp[0].state_dict())
        ours.fc2.load_state_dict(ref.mlp[2].state_dict())
        for conv, (w, b) in ((ours.conv1, _folded(ref.conv1.weight, ref.conv1.bias, ref.bn1)),
                             (ours.conv2, _folded(ref.conv2.weight, ref.conv2.bias, ref.bn2))):
            conv.weight.copy_(w), conv.bias.copy_(b)
        assert max(max_diff(ours(x), ref(x)) for x in _inputs(32)) <= 1e-12


class _SaLayerOfficial(nn.Module):
    """SA-Net's ``sa_layer``: its parameters, its forward (chunk, gates, cat, shuffle)."""

    def __init__(self, channel: int, groups: int = 64) -> None:
        super().__init__()
        self.groups = groups
        half = channel // (2 * groups)
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.gn = nn.GroupNorm(half, half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b * self.groups, -1, h, w)
        x_0, x_1 = x.chunk(2, dim=1)
        xn = x_0 * torch.sigmoid(self.cweight * F.adaptive_avg_pool2d(x_0, 1) + self.cbias)
        xs = x_1 * torch.sigmoid(self.sweight * self.gn(x_1) + self.sbias)
        out = torch.cat([xn, xs], dim=1).reshape(b, -1, h, w)
        out = out.reshape(b, 2, -1, h, w).permute(0, 2, 1, 3, 4)
        return out.reshape(b, -1, h, w)


@pytest.mark.parametrize("groups", [64, 4])
def test_shuffle_is_the_official_code(groups: int) -> None:
    ref = _randomise(_SaLayerOfficial(256, groups)).double()
    ours = create_attention("shuffle", 256, groups=groups, gate="sigmoid", dtype=torch.float64)
    assert ours.shuffle and gate_methods(ours) is None  # the paper's permutation: no product of gates
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert max(max_diff(ours(x), ref(x)) for x in _inputs(256)) <= 1e-12
    fresh_ref, fresh = _SaLayerOfficial(256, groups), create_attention("shuffle", 256, groups=groups, gate="sigmoid")
    assert all(torch.equal(a, b) for a, b in zip(fresh_ref.state_dict().values(), fresh.state_dict().values(),
                                                 strict=True))  # the official init


def test_shuffle_identity_form_does_not_permute() -> None:
    m = perturbed("shuffle", 16, groups=2)
    assert not m.shuffle and gate_methods(m) == ("scale",)
    shuffled = perturbed("shuffle", 16, groups=2, shuffle=True)
    x = torch.randn(2, 16, 4, 4)
    b, c, h, w = x.shape
    want = m(x).reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
    assert torch.equal(shuffled(x), want)
    with pytest.raises(AttentionError, match=r"shuffle: shuffle = 'yes' is not valid"):
        create_attention("shuffle", 16, groups=2, shuffle="yes")


class _TripletOfficial(nn.Module):
    """The official ``TripletAttention``: permute, Z-pool (max, mean), conv 7x7 without bias,
    BatchNorm, sigmoid, permute back; the mean of the three (or two) branches."""

    def __init__(self, no_spatial: bool = False) -> None:
        super().__init__()
        self.no_spatial = no_spatial
        names = ["cw", "hc"] + ([] if no_spatial else ["hw"])
        self.convs = nn.ModuleDict({n: nn.Conv2d(2, 1, 7, padding=3, bias=False) for n in names})
        self.bns = nn.ModuleDict({n: nn.BatchNorm2d(1, eps=1e-5, momentum=0.01) for n in names})

    def gate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.bns[name](self.convs[name](z)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out11 = self.gate("cw", x.permute(0, 2, 1, 3).contiguous()).permute(0, 2, 1, 3).contiguous()
        out21 = self.gate("hc", x.permute(0, 3, 2, 1).contiguous()).permute(0, 3, 2, 1).contiguous()
        if self.no_spatial:
            return 1 / 2 * (out11 + out21)
        return 1 / 3 * (self.gate("hw", x) + out11 + out21)


@pytest.mark.parametrize("no_spatial", [False, True])
def test_triplet_is_the_official_code_with_batchnorm_folded(no_spatial: bool) -> None:
    ref = _randomise(_TripletOfficial(no_spatial)).double()
    for bn in ref.bns.values():
        _bn_eval(bn)
    ours = create_attention("triplet", 16, no_spatial=no_spatial, gate="sigmoid", dtype=torch.float64)
    with torch.no_grad():
        for name, conv in ref.convs.items():
            w, b = _folded(conv.weight, None, ref.bns[name])
            getattr(ours, name).weight.copy_(w), getattr(ours, name).bias.copy_(b)
        assert max(max_diff(ours(x), ref(x)) for x in _inputs(16)) <= 1e-12


class _BamOfficial(nn.Module):
    """The official ``BAM``: the channel gate pools with an H x H window (square maps), a
    Linear-BN-ReLU-Linear MLP; the spatial gate is conv 1x1, BN, ReLU, two dilated 3x3
    with BN and ReLU, conv 1x1 to one map; ``(1 + sigmoid(channel * spatial)) * x``."""

    def __init__(self, c: int, reduction: int = 16, dilation_conv_num: int = 2, dilation_val: int = 4) -> None:
        super().__init__()
        r = c // reduction
        self.fc = nn.Linear(c, r)
        self.bn_c = nn.BatchNorm1d(r)
        self.fc_final = nn.Linear(r, c)
        self.reduce = nn.Conv2d(c, r, 1)
        self.bn_reduce = nn.BatchNorm2d(r)
        self.dilated = nn.ModuleList(nn.Conv2d(r, r, 3, padding=dilation_val, dilation=dilation_val)
                                     for _ in range(dilation_conv_num))
        self.bn_dilated = nn.ModuleList(nn.BatchNorm2d(r) for _ in range(dilation_conv_num))
        self.final = nn.Conv2d(r, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, x.size(2), stride=x.size(2)).flatten(1)
        channel = self.fc_final(torch.relu(self.bn_c(self.fc(pooled)))).unsqueeze(2).unsqueeze(3).expand_as(x)
        s = torch.relu(self.bn_reduce(self.reduce(x)))
        for conv, bn in zip(self.dilated, self.bn_dilated, strict=True):
            s = torch.relu(bn(conv(s)))
        spatial = self.final(s).expand_as(x)
        return (1 + torch.sigmoid(channel * spatial)) * x


@pytest.mark.parametrize("args", [{}, {"dilation_conv_num": 1, "dilation_val": 2}])
def test_bam_is_the_official_code_with_batchnorm_folded(args: dict[str, Any]) -> None:
    ref = _randomise(_BamOfficial(64, **args)).double()
    for bn in (ref.bn_c, ref.bn_reduce, *ref.bn_dilated):
        _bn_eval(bn)
    ours = create_attention("bam", 64, gate="sigmoid", dtype=torch.float64, **args)
    convs = [m for m in ours.spatial if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        pairs = [(ours.fc1, ref.fc, ref.bn_c), (convs[0], ref.reduce, ref.bn_reduce),
                 *zip(convs[1:-1], ref.dilated, ref.bn_dilated, strict=True)]
        for layer, theirs, bn in pairs:
            w, b = _folded(theirs.weight, theirs.bias, bn)
            layer.weight.copy_(w), layer.bias.copy_(b)
        ours.fc2.load_state_dict(ref.fc_final.state_dict())
        convs[-1].load_state_dict(ref.final.state_dict())
        # square maps: the official H x H pool is the global pool there
        assert max(max_diff(ours(x), ref(x)) for x in _inputs(64, ((7, 7), (9, 9), (1, 1)))) <= 1e-12


@pytest.mark.parametrize("channels", [16, 64, 100])
def test_scse_is_smps_module(channels: int) -> None:
    from segmentation_models_pytorch.base.modules import SCSEModule

    ref = _randomise(SCSEModule(channels)).double()
    ours = create_attention("scse", channels, gate="sigmoid", dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())  # smp's keys, strict
    with torch.no_grad():
        for train in (True, False):
            assert max(max_diff(ours.train(train)(x), ref.train(train)(x)) for x in _inputs(channels)) <= 1e-12


class _LskaOfficial(nn.Module):
    """The official ``LSKA`` for k_size 7 and 23, its convolutions as listed there."""

    def __init__(self, dim: int, k_size: int) -> None:
        super().__init__()
        if k_size == 7:
            self.conv0h = nn.Conv2d(dim, dim, (1, 3), padding=(0, 1), groups=dim)
            self.conv0v = nn.Conv2d(dim, dim, (3, 1), padding=(1, 0), groups=dim)
            self.conv_spatial_h = nn.Conv2d(dim, dim, (1, 3), padding=(0, 2), groups=dim, dilation=2)
            self.conv_spatial_v = nn.Conv2d(dim, dim, (3, 1), padding=(2, 0), groups=dim, dilation=2)
        else:
            self.conv0h = nn.Conv2d(dim, dim, (1, 5), padding=(0, 2), groups=dim)
            self.conv0v = nn.Conv2d(dim, dim, (5, 1), padding=(2, 0), groups=dim)
            self.conv_spatial_h = nn.Conv2d(dim, dim, (1, 7), padding=(0, 9), groups=dim, dilation=3)
            self.conv_spatial_v = nn.Conv2d(dim, dim, (7, 1), padding=(9, 0), groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.clone()
        attn = self.conv_spatial_v(self.conv_spatial_h(self.conv0v(self.conv0h(x))))
        return u * self.conv1(attn)


@pytest.mark.parametrize("kernel_size", [7, 23])
def test_lska_is_the_official_code(kernel_size: int) -> None:
    # 4 channels: PyTorch's float64 depthwise convolution on the CPU costs ~40 ms a channel
    ref = _randomise(_LskaOfficial(4, kernel_size)).double()
    ours = create_attention("lska", 4, kernel_size=kernel_size, gate="sigmoid", dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert max(max_diff(ours(x), ref(x)) for x in _inputs(4)) <= 1e-12


def test_lska_decompositions_are_the_official_table() -> None:
    """Padding keeps the size: (k1 - 1) * d / 2 is an integer for every official size."""
    assert sorted(LSKA_KERNELS) == [7, 11, 23, 35, 41, 53]
    assert [(k0, k1, d) for k0, k1, d in LSKA_KERNELS.values()] == [
        (3, 3, 2), (3, 5, 2), (5, 7, 3), (5, 11, 3), (5, 13, 3), (5, 17, 3)]
    x = torch.randn(1, 4, 9, 6)
    for k in LSKA_KERNELS:
        assert create_attention("lska", 4, kernel_size=k)(x).shape == x.shape


class _MlcaOfficial(nn.Module):
    """The official ``MLCA`` forward: pools, the cell-major 1-D sequence, the mix, un-pooling."""

    def __init__(self, in_size: int, local_size: int = 5, gamma: int = 2, b: int = 1, local_weight: float = 0.5):
        super().__init__()
        self.local_size = local_size
        t = int(abs(math.log(in_size, 2) + b) / gamma)
        k = t if t % 2 else t + 1
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.conv_local = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.local_weight = local_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local_arv = F.adaptive_avg_pool2d(x, self.local_size)
        global_arv = F.adaptive_avg_pool2d(local_arv, 1)
        b, c, m, n = x.shape
        temp_local = local_arv.view(b, c, -1).transpose(-1, -2).reshape(b, 1, -1)
        temp_global = global_arv.view(b, c, -1).transpose(-1, -2)
        y_local = self.conv_local(temp_local)
        y_global = self.conv(temp_global)
        y_local_t = y_local.reshape(b, self.local_size * self.local_size, c).transpose(-1, -2).view(
            b, c, self.local_size, self.local_size)
        y_global_t = y_global.view(b, -1).unsqueeze(-1).unsqueeze(-1)
        att_local = y_local_t.sigmoid()
        att_global = F.adaptive_avg_pool2d(y_global_t.sigmoid(), [self.local_size, self.local_size])
        att_all = F.adaptive_avg_pool2d(att_global * (1 - self.local_weight) + att_local * self.local_weight, [m, n])
        return x * att_all


@pytest.mark.parametrize("channels,args", [(64, {}), (256, {"local_size": 3, "local_weight": 0.3}), (6, {})])
def test_mlca_is_the_official_code(channels: int, args: dict[str, Any]) -> None:
    ref = _randomise(_MlcaOfficial(channels, **args)).double()
    ours = create_attention("mlca", channels, gate="sigmoid", dtype=torch.float64, **args)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        xs = _inputs(channels, ((7, 7), (13, 11), (3, 4), (16, 16)))
        assert max(max_diff(ours(x), ref(x)) for x in xs) <= 1e-12


class _SgeOfficial(nn.Module):
    """The official ``SpatialGroupEnhance``."""

    def __init__(self, groups: int = 64) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.zeros(1, groups, 1, 1))
        self.bias = nn.Parameter(torch.ones(1, groups, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        x = x.view(b * self.groups, -1, h, w)
        xn = (x * F.adaptive_avg_pool2d(x, 1)).sum(dim=1, keepdim=True)
        t = xn.view(b * self.groups, -1)
        t = t - t.mean(dim=1, keepdim=True)
        std = t.std(dim=1, keepdim=True) + 1e-5
        t = (t / std).view(b, self.groups, h, w)
        t = (t * self.weight + self.bias).view(b * self.groups, 1, h, w)
        return (x * torch.sigmoid(t)).view(b, c, h, w)


@pytest.mark.parametrize("groups", [64, 4])
def test_sge_is_the_official_code(groups: int) -> None:
    ref = _randomise(_SgeOfficial(groups)).double()
    ours = create_attention("sge", 128, groups=groups, gate="sigmoid", dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert max(max_diff(ours(x), ref(x)) for x in _inputs(128)) <= 1e-12
    fresh = create_attention("sge", 128, groups=groups, gate="sigmoid")
    assert torch.equal(fresh.weight, _SgeOfficial(groups).weight) and torch.equal(fresh.bias, _SgeOfficial(groups).bias)


def test_sge_on_one_position_is_finite() -> None:
    """The official code's unbiased deviation of one position is 0 / 0; here the map normalises to 0."""
    x = torch.randn(2, 8, 1, 1)
    with pytest.warns(UserWarning, match="degrees of freedom"):
        assert torch.isnan(_SgeOfficial(4)(x)).all()
    assert torch.equal(create_attention("sge", 8, groups=4, gate="sigmoid")(x), x * torch.sigmoid(torch.tensor(1.0)))


class _PsaOfficial(nn.Module):
    """The official ``PSA_p`` (parallel) and ``PSA_s`` (sequential), inplanes = planes."""

    def __init__(self, c: int, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.inter = c // 2
        self.conv_q_right = nn.Conv2d(c, 1, 1, bias=False)
        self.conv_v_right = nn.Conv2d(c, self.inter, 1, bias=False)
        if layout == "parallel":
            self.conv_up = nn.Conv2d(self.inter, c, 1, bias=False)
        else:
            self.conv_up = nn.Sequential(nn.Conv2d(self.inter, self.inter // 4, 1),
                                         nn.LayerNorm([self.inter // 4, 1, 1]), nn.ReLU(inplace=True),
                                         nn.Conv2d(self.inter // 4, c, 1))
        self.conv_q_left = nn.Conv2d(c, self.inter, 1, bias=False)
        self.conv_v_left = nn.Conv2d(c, self.inter, 1, bias=False)

    def spatial_pool(self, x: torch.Tensor) -> torch.Tensor:  # the official name: the channel-only branch
        input_x = self.conv_v_right(x)
        batch, channel, height, width = input_x.size()
        input_x = input_x.view(batch, channel, height * width)
        context_mask = torch.softmax(self.conv_q_right(x).view(batch, 1, height * width), dim=2)
        context = torch.matmul(input_x, context_mask.transpose(1, 2)).unsqueeze(-1)
        return x * torch.sigmoid(self.conv_up(context))

    def channel_pool(self, x: torch.Tensor) -> torch.Tensor:  # the official name: the spatial-only branch
        g_x = self.conv_q_left(x)
        batch, channel, height, width = g_x.size()
        avg_x = F.adaptive_avg_pool2d(g_x, 1).view(batch, channel, 1).permute(0, 2, 1)
        theta_x = self.conv_v_left(x).view(batch, self.inter, height * width)
        if self.layout == "parallel":
            context = torch.softmax(torch.matmul(avg_x, theta_x), dim=2)
        else:
            context = torch.matmul(avg_x, torch.softmax(theta_x, dim=2))
        return x * torch.sigmoid(context.view(batch, 1, height, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "parallel":
            return self.channel_pool(x) + self.spatial_pool(x)
        return self.channel_pool(self.spatial_pool(x))


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_polarized_is_the_official_code(layout: str) -> None:
    ref = _randomise(_PsaOfficial(32, layout)).double()
    ours = create_attention("polarized", 32, layout=layout, gate="sigmoid", dtype=torch.float64)
    missing = ours.load_state_dict(ref.state_dict(), strict=False)
    assert missing.missing_keys == ["alpha"] and not missing.unexpected_keys  # the official keys, and the blend
    assert torch.equal(ours.alpha, torch.ones_like(ours.alpha))
    with torch.no_grad():
        assert max(max_diff(ours(x), ref(x)) for x in _inputs(32)) <= 1e-12


def test_polarized_layouts_differ_as_the_official_classes_do() -> None:
    """PSA_p: one projection, softmax after the product; PSA_s: a LayerNorm bottleneck,
    softmax of the values before it."""
    p, s = create_attention("polarized", 32), create_attention("polarized", 32, layout="sequential")
    assert isinstance(p.conv_up, nn.Conv2d) and p.conv_up.bias is None
    assert [type(m).__name__ for m in s.conv_up] == ["Conv2d", "LayerNorm", "ReLU", "Conv2d"]
    assert s.conv_up[0].out_channels == 4


# ---- gates, fused adds and records ----------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_declared_fused_gates_match_forward(variant: tuple[str, dict[str, Any]]) -> None:
    """``fused_gates`` promises ``forward(x) == x * gate1(x)`` (then times ``gate2``, ...)."""
    name, args = variant
    c = channels_for(name, args)
    m = perturbed(name, c, **args)
    x, shortcut = torch.randn(2, c, 7, 5), torch.randn(2, c, 7, 5)
    methods = gate_methods(m)
    assert methods == (("channel_scale", "spatial_scale") if name == "gam" else ("scale",))
    y = x
    for method in methods:
        y = y * getattr(m, method)(y)
    assert torch.equal(m(x), y)
    torch.testing.assert_close(gated_residual(m, x, shortcut), m(x) + shortcut)


def test_bam_gate_forms() -> None:
    """The paper's residual gate 1 + sigmoid(z) (1.5 at z = 0); the identity form 2 * sigmoid(z)."""
    torch.manual_seed(0)
    paper = create_attention("bam", 32, gate="sigmoid")
    with torch.no_grad():
        paper.fc2.weight.zero_(), paper.fc2.bias.zero_()
    x = torch.randn(2, 32, 5, 5)
    assert torch.equal(paper(x), x * 1.5)
    ident = create_attention("bam", 32)
    ident.load_state_dict(_randomise(copy.deepcopy(paper)).state_dict())
    z = ident.fc2(ident.act(ident.fc1(x.mean((2, 3)))))[:, :, None, None] * ident.spatial(x)
    torch.testing.assert_close(ident(x), x * 2 * torch.sigmoid(z))


def test_lska_identity_form_is_the_papers_function_at_another_init() -> None:
    m = create_attention("lska", 8)
    assert torch.equal(m.conv1.weight, torch.zeros_like(m.conv1.weight))
    assert torch.equal(m.conv1.bias, torch.ones_like(m.conv1.bias))
    paper = create_attention("lska", 8, gate="sigmoid")
    paper.load_state_dict(m.state_dict())
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(paper(x), x)


def test_scse_identity_form_is_the_papers_function_at_another_init() -> None:
    m = _randomise(create_attention("scse", 32))
    paper = create_attention("scse", 32, gate="sigmoid")
    paper.load_state_dict(m.state_dict())
    x = torch.randn(2, 32, 6, 6)
    assert torch.equal(paper(x), m(x))


# ---- constraints: skipped sites, with why -----------------------------------------------------


@pytest.mark.parametrize("name,channels,args,why", [
    ("ema", 48, {}, "48 channels are not divisible by factor = 32"),
    ("ema", 48, {"factor": 5}, "48 channels are not divisible by factor = 5"),
    ("sge", 32, {}, "32 channels are not divisible by groups = 64"),
    ("shuffle", 64, {}, "64 channels are not divisible by 2 * groups = 128 (each group is split in two halves)"),
    ("gam", 3, {}, "3 channels leave a bottleneck of floor(3 * 0.25) = 0 channels; give rd_channels, or a larger "
                   "rd_ratio"),
    ("gam", 24, {"groups": 4}, "groups = 4 must divide the 24 channels and the bottleneck's floor(24 * 0.25) = 6 "
                               "(the grouped spatial convolutions)"),
    ("bam", 8, {}, "8 channels leave a bottleneck of floor(8 * 0.0625) = 0 channels"),
    ("scse", 15, {}, "15 channels leave a bottleneck of floor(15 * 0.0625) = 0 channels"),
    ("polarized", 1, {}, "1 channels are too few for the parallel layout: its branches are C // 2 wide, at least 2"),
    ("polarized", 6, {"layout": "sequential"}, "6 channels are too few for the sequential layout: its branches are "
                                               "C // 2 wide and its channel bottleneck C // 8, at least 8 channels"),
])
def test_a_constraint_is_a_reason_and_a_constructor_error(name: str, channels: int, args: dict[str, Any],
                                                         why: str) -> None:
    cls = get_attention(name)
    assert cls.site_problem(channels, (7, 7), **args).startswith(why)
    with pytest.raises(AttentionError, match=rf"^{name}: {__import__('re').escape(why)}"):
        create_attention(name, channels, **args)


def test_constrained_types_say_their_constraints() -> None:
    for name in NAMES:
        cls = get_attention(name)
        text = getattr(cls, "constraints", None)
        assert (text is not None) == (name in CONSTRAINED), name
        assert text is None or (text and "\n" not in text and len(text) < 140), name
    assert get_attention("gam").site_problem(32, (5, 5), rd_channels=2) is None  # rd_channels overrides


def test_arguments_a_constraint_cannot_judge_are_errors_of_the_rule() -> None:
    """factor = 0 is no constraint to skip sites by: the plan reports it with the rule."""
    assert get_attention("ema").site_problem(64, (5, 5), factor=0) is None
    rules = parse_rules({"rule": [{"at": "residual-add", "attn": "ema", "args": {"factor": 0}}]}, "my rules")
    with pytest.raises(AttentionError, match=r"my rules, rule 1: ema: factor = 0 is not valid: an integer >= 1"):
        retrofit.plan(cached("resnet18"), rules=rules, input_size=64)
    rules = parse_rules({"rule": [{"at": "residual-add", "attn": "lska", "args": {"kernel_size": 9}}]}, "my rules")
    with pytest.raises(AttentionError, match=r"lska: kernel_size = 9 is not valid: one of 7, 11, 23, 35, 41, 53"):
        retrofit.plan(cached("resnet18"), rules=rules, input_size=64)


def test_sites_a_type_cannot_take_are_skipped_in_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    plan = retrofit.plan(cached("resnet18"), "shuffle", input_size=64)
    assert [p.site.path for p in plan.placements] == ["layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
                                                     "layer4.1"]
    assert [(s.path, why) for s, why in plan.skipped] == [
        (f"layer1.{i}", "shuffle: 64 channels are not divisible by 2 * groups = 128 (each group is split in two "
                        "halves) (built-in 'shuffle', rule 1)") for i in range(2)]
    report = get_report(retrofit.retrofit(cached("resnet18"), "shuffle", input_size=64))
    assert len(report.rows) == 6 and report.max_abs_diff == 0.0
    assert cli_main(["resnet18", "--attn", "shuffle", "--input-size", "64", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines if "shuffle: 64 channels are not divisible by 2 * groups = 128" in line
            and " skipped " in line] == ["layer1.0", "layer1.1"]


# ---- everywhere a type goes: built-in rules, both forms, saves, ONNX, compile, gates ---------


def _assert_identity(model: nn.Module, reference: nn.Module, size: int) -> None:
    """Exact identity at init: eval mode from the report, train mode (batch statistics) here."""
    assert get_report(model).max_abs_diff == 0.0
    reference = copy.deepcopy(reference).train()
    model.train()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("name", NAMES)
def test_builtin_rules_are_an_exact_identity_on_a_real_model(name: str) -> None:
    """Each type's own rule set on ResNet-18 (the in-place form: the mixed model below)."""
    gm = retrofit.retrofit(cached("resnet18"), rules=builtin_rules_dir() / f"{name}.toml", input_size=64)
    report = get_report(gm)
    assert report.rows and {r.attn for r in report.rows} == {name}
    _assert_identity(gm, cached("resnet18"), 64)


# One residual block per variant of a narrow ResNet-34 (16 blocks at 32 and 64 channels).
_NARROW34 = {"num_classes": 10, "channels": (32, 32, 64, 64), "zero_init_last": False}
_MIXED = [v for v in VARIANTS if fits(v[0], 32, v[1]) and v != ("lska", {"kernel_size": 23})]
_BLOCKS = [f"layer{s}.{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3), strict=True) for b in range(n)]


@functools.cache
def _mixed_base() -> nn.Module:
    torch.manual_seed(0)
    return retrofit.create_model("resnet34", **_NARROW34).eval()


@functools.cache
def _mixed_built(keep_class: bool) -> nn.Module:
    rules = parse_rules({"rule": [{"at": "residual-add", "attn": name, "args": args, "include": [block]}
                                  for (name, args), block in zip(_MIXED, _BLOCKS, strict=False)]})
    return retrofit.retrofit(_mixed_base(), rules=rules, input_size=32, keep_class=keep_class)


def _mixed(keep_class: bool = False) -> nn.Module:
    """Every variant that fits 32 channels, one per block, in one rewrite (a fresh copy)."""
    return copy.deepcopy(_mixed_built(keep_class))


def _perturb(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for row in get_report(model).rows:
            for p in model.get_submodule(row.module).parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_mixed_model_covers_every_type() -> None:
    assert len(_MIXED) == 16 and {n for n, _ in _MIXED} == set(NAMES)


@pytest.mark.parametrize("keep_class", [False, True], ids=["graph-module", "keep-class"])
def test_every_type_in_one_model_saves_and_loads_bit_identical(tmp_path: Path, keep_class: bool) -> None:
    model = _mixed(keep_class)
    report = get_report(model)
    assert [r.attn for r in report.rows] == [n for n, _ in _MIXED]
    if keep_class:
        assert type(model) is type(_mixed_base())
    _assert_identity(model, _mixed_base(), 32)
    _perturb(model)
    path = retrofit.save(model, tmp_path / "mixed.safetensors")
    loaded = retrofit.load(path)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert model.state_dict().keys() == loaded.state_dict().keys()


class _Rung(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + x)


class _Ladder(nn.Module):
    """A stem, ten residual rungs at 32 channels, a head: the smallest graph with a site per type."""

    def __init__(self, c: int = 32, n: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(_Rung(c) for _ in range(n))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((2, 3)))


_ONE_EACH = [("ema", {"factor": 8}), ("gam", {"groups": 4}), ("shuffle", {"groups": 4}), ("triplet", {}), ("bam", {}),
             ("scse", {}), ("lska", {}), ("mlca", {}), ("sge", {"groups": 4}), ("polarized", {"layout": "sequential"})]


def test_every_type_compiles_whole_and_exports_to_onnx() -> None:
    """Every type in one model: the fused adds and modules in one graph (aot_eager: no C++
    build), and the ONNX export run in onnxruntime."""
    assert {n for n, _ in _ONE_EACH} == set(NAMES)
    torch.manual_seed(0)
    rules = parse_rules({"rule": [{"at": "residual-add", "attn": name, "args": args, "include": [f"blocks.{i}"]}
                                  for i, (name, args) in enumerate(_ONE_EACH)]})
    gm = _perturb(retrofit.retrofit(_Ladder().eval(), rules=rules, input_size=(3, 8, 8)))
    assert sum(n.target is gated_residual for n in gm.graph.nodes) == len(_ONE_EACH)  # every one fuses
    x = torch.randn(2, 3, 8, 8)
    assert_compiles_like_eager(gm, x, atol=1e-5)
    assert_onnx_matches(gm, x)


def test_every_type_records_its_gates() -> None:
    model = _mixed()
    rows = get_report(model).rows
    rec = record_gates(model, torch.randn(4, 3, 32, 32))
    assert rec.skipped == () and [s.module for s in rec.sites] == [r.module for r in rows]
    for s, r in zip(rec.sites, rows, strict=True):
        assert s.method == ("channel_scale" if r.attn == "gam" else "scale")
        assert torch.equal(s.values, torch.ones(4, r.channels))  # identity gates: exactly 1.0


# ---- built-in rule files -------------------------------------------------------------------------


def test_every_type_has_a_rule_file() -> None:
    assert set(NAMES) <= set(retrofit.list_attention())
    builtins = retrofit.list_builtin_rules()
    assert all(builtins.get(n) for n in NAMES)
    assert all(builtins.get(f"yolo-{n}-backbone") for n in ("ema", "gam", "simam", "shuffle"))


def test_bam_goes_where_the_paper_puts_it() -> None:
    """After the last block of every stage but the last: ResNet-50's three bottlenecks."""
    plan = retrofit.plan(cached("resnet50"), "bam", input_size=224)
    assert [(p.site.path, p.position, p.channels) for p in plan.placements] == [
        ("layer1.2", "after", 256), ("layer2.3", "after", 512), ("layer3.5", "after", 1024)]


def test_yolo_placements() -> None:
    """After each C2f of YOLOv8n's backbone, with the rule files' arguments (EMA and shuffle
    attention in 8 groups, GAM grouped by 4); GAM, the largest, inserted: an exact identity
    (EMA through the trainer: tests/test_ultralytics.py)."""
    model = retrofit.create_model("ultralytics:yolov8n.yaml", nc=3)
    sites = [(f"model.{i}.cv2.conv", c) for i, c in ((2, 32), (4, 64), (6, 128), (8, 256))]
    for name, args in (("ema", {"factor": 8}), ("gam", {"groups": 4}), ("simam", {}), ("shuffle", {"groups": 8})):
        plan = retrofit.plan(model, f"yolo-{name}-backbone", input_size=64)
        assert [(p.site.path, p.channels, p.attn, dict(p.args)) for p in plan.placements] == [
            (path, c, name, args) for path, c in sites], name
    report = get_report(retrofit.retrofit(model, "yolo-gam-backbone", input_size=64))
    assert [r.params for r in report.rows] == [gam_params(c, 4) for _, c in sites] and report.max_abs_diff == 0.0



def test_mid_position_in_yolo_bottlenecks() -> None:
    """Channel self-attention goes before the last convolution of each Bottleneck (its
    ``mid`` position) even though the rewrite calls Ultralytics' Conv blocks whole elsewhere:
    the slimmer trace that would hide that convolution is not taken."""
    model = retrofit.create_model("ultralytics:yolov8n.yaml", nc=3)
    report = get_report(retrofit.retrofit(model, "chsa", input_size=64))
    assert [r.module for r in report.rows] == [
        "model.2.m.0.chsa_mid", "model.4.m.0.chsa_mid", "model.4.m.1.chsa_mid", "model.6.m.0.chsa_mid",
        "model.6.m.1.chsa_mid", "model.8.m.0.chsa_mid"]
    assert report.max_abs_diff == 0.0

# ---- the zoo slice, both forms (slow: run with -m slow) -------------------------------------


SLICE = [("timm", "resnet18"), ("timm", "seresnext26d_32x4d"), ("timm", "dla34"), ("timm", "ghostnet_100"),
         ("timm", "rexnet_100"), ("timm", "nf_resnet26"), ("torchvision", "squeezenet1_0"),
         ("torchvision", "shufflenet_v2_x0_5")]


@pytest.mark.slow
@pytest.mark.parametrize("keep_class", [False, True], ids=["graph-module", "keep-class"])
@pytest.mark.parametrize("source,model_name", SLICE)
def test_zoo_slice(source: str, model_name: str, keep_class: bool) -> None:
    """The zoo sweep's slice (tests/test_zoo.py), every type by its built-in rules, stacked
    on existing attention: identity at init, gradient to every new parameter, the original
    model untouched. A type may fit no site of a model (shuffle attention's 2 x 64 groups
    divide none of GhostNet's channels): then every site is skipped for its constraint."""
    import timm
    import torchvision

    torch.manual_seed(0)
    model = (timm.create_model(model_name, pretrained=False) if source == "timm"
             else torchvision.models.get_model(model_name, weights=None)).eval()
    x = torch.randn(2, 3, 64, 64)
    want = model(x).detach()  # autograd on, as below: some kernels differ without it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    skipped_all: list[str] = []
    for name in NAMES:
        gm = retrofit.retrofit(model, name, input_size=64, on_existing="stack", keep_class=keep_class,
                               verify=False).eval()
        report = get_report(gm)
        if not report.rows:
            assert report.skipped and all(why.startswith(f"{name}: ") for _, why in report.skipped), report.skipped
            skipped_all.append(name)
            continue
        got = gm(x)
        assert torch.equal(got, want), (model_name, name, (got - want).abs().max().item())
        got.float().mean().backward()
        new = [p for r in report.rows for p in gm.get_submodule(r.module).parameters()]
        assert all(p.grad is not None for p in new), (model_name, name)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(skipped_all) <= set(CONSTRAINED), skipped_all  # a type without constraints fits every model
