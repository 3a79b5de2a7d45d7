"""Attention modules: exact identity at init, gradients within two steps, exact parameter counts."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule

from retrofit import AttentionError, create_attention, list_attention, register_attention
from retrofit.attention import Cbam, EfficientChannelAttn, SqueezeExcite, eca_kernel_size

from .checks import assert_every_parameter_learns

NAMES = ["se", "eca", "cbam"]


def se_params(c: int) -> int:
    rd = max(8, int(c / 16 + 4) // 8 * 8)  # timm make_divisible(c / 16, 8, round_limit=0)
    return 2 * c * rd + rd + c


def eca_params(c: int) -> int:
    t = int(abs(math.log2(c) + 1) / 2)
    return max(t if t % 2 else t + 1, 3)


def cbam_params(c: int) -> int:
    rd = max(1, int(c / 16 + 0.5))  # make_divisible(c / 16, 1, round_limit=0)
    return 2 * c * rd + 2 * 7 * 7 + 1


CLOSED_FORM = {"se": se_params, "eca": eca_params, "cbam": cbam_params}


def test_registry_lists_builtins() -> None:
    assert {"se", "eca", "cbam"} <= set(list_attention())


@given(
    name=st.sampled_from(NAMES),
    channels=st.sampled_from([1, 3, 7, 16, 64]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    batch=st.integers(1, 3),
    train=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
@settings(max_examples=60, deadline=None)
def test_identity_gate_is_exact_for_any_input(name, channels, h, w, batch, train, scale) -> None:
    torch.manual_seed(channels * 100 + h * 10 + w)
    m = create_attention(name, channels).train(train)
    x = torch.randn(batch, channels, h, w) * scale
    assert torch.equal(m(x), x)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_identity_gate_is_exact_in_other_dtypes(name: str, dtype: torch.dtype) -> None:
    m = create_attention(name, 32, dtype=dtype)
    x = torch.randn(2, 32, 5, 7, dtype=dtype)
    assert torch.equal(m(x), x)
    assert all(p.dtype == dtype for p in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_sigmoid_gate_changes_output(name: str) -> None:
    torch.manual_seed(0)
    m = create_attention(name, 32, gate="sigmoid")
    x = torch.randn(2, 32, 5, 5)
    y = m(x)
    assert y.shape == x.shape
    assert not torch.equal(y, x)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_gradient_within_two_steps(name: str) -> None:
    torch.manual_seed(0)
    m = create_attention(name, 32)
    assert_every_parameter_learns(m, 32)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 3, 7, 64, 256, 2048])
@pytest.mark.parametrize("gate", ["identity", "sigmoid"])
def test_parameter_count_closed_form(name: str, channels: int, gate: str) -> None:
    m = create_attention(name, channels, gate=gate)
    assert sum(p.numel() for p in m.parameters()) == CLOSED_FORM[name](channels)


@pytest.mark.parametrize("channels", [64, 256, 1024, 2048])
def test_se_matches_timm_semodule(channels: int) -> None:
    """With the sigmoid gate, SE is timm's SEModule: same parameters, same outputs."""
    ours = SqueezeExcite(channels, gate="sigmoid")
    theirs = SEModule(channels)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, channels, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x))


def test_cbam_channel_gate_matches_timm() -> None:
    """CBAM's channel half is timm's ChannelAttn (shared MLP on avg + max, no biases)."""
    theirs = CbamModule(64)
    ours = Cbam(64, gate="sigmoid")
    ours.fc1.load_state_dict(theirs.channel.fc1.state_dict())
    ours.fc2.load_state_dict(theirs.channel.fc2.state_dict())
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(x * ours.channel_scale(x), theirs.channel(x))
    assert ours.spatial.kernel_size == (7, 7) and ours.spatial.bias is not None


@pytest.mark.parametrize("channels,k", [(1, 3), (16, 3), (64, 3), (256, 5), (512, 5), (1024, 5), (2048, 7)])
def test_eca_adaptive_kernel(channels: int, k: int) -> None:
    assert eca_kernel_size(channels) == k
    assert EfficientChannelAttn(channels).conv.kernel_size == (k,)


def test_eca_explicit_kernel_is_used() -> None:
    assert EfficientChannelAttn(64, kernel_size=9).conv.kernel_size == (9,)


def test_reset_parameters_restores_identity() -> None:
    m = create_attention("cbam", 16)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    x = torch.randn(1, 16, 3, 3)
    assert not torch.equal(m(x), x)
    m.reset_parameters()
    assert torch.equal(m(x), x)


def test_unknown_attention_lists_valid_and_closest() -> None:
    with pytest.raises(AttentionError, match=r"unknown attention 'cbma'; did you mean 'cbam'\? \(valid: .*cbam.*eca.*se"):
        create_attention("cbma", 8)


def test_unknown_gate() -> None:
    with pytest.raises(AttentionError, match=r"unknown gate 'tanh' \(valid: identity, sigmoid\)"):
        create_attention("se", 8, gate="tanh")


@pytest.mark.parametrize("divisor", [1, 3, 8])
@pytest.mark.parametrize("round_limit", [0.0, 0.9])
def test_make_divisible_is_timms(divisor: int, round_limit: float) -> None:
    """The local copy (so building a module does not import timm) rounds exactly as timm's."""
    from timm.layers import make_divisible as timm_make_divisible

    from retrofit.attention._reduction import make_divisible

    for v in [0.25, 1, 3.9, 4, 7.5, 12.3, 64 / 16, 100, 127.9, 2048 / 16, 1000 / 3]:
        assert make_divisible(v, divisor, round_limit=round_limit) == timm_make_divisible(
            v, divisor, round_limit=round_limit
        ), v


def test_import_leaves_timm_and_torchvision_alone() -> None:
    """`import retrofit` costs torch, not timm (about two seconds more) or torchvision."""
    code = "import sys, retrofit; print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_activation_by_name_still_comes_from_timm() -> None:
    from timm.layers import get_act_layer

    m = create_attention("se", 16, act_layer="silu")
    assert type(m.act) is get_act_layer("silu")


def test_bad_argument_names_the_attention() -> None:
    with pytest.raises(AttentionError, match=r"invalid arguments for attention 'se' \(SqueezeExcite\) at 8 channels"):
        create_attention("se", 8, reduction=4)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(AttentionError, match=r"'se' is already registered to SqueezeExcite"):
        register_attention("se")(torch.nn.Identity)
