"""Coordinate Attention.

Hou, Zhou, Feng: "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021,
arXiv:2103.02907.

Also timm's simplified variant, which is not in the paper: ``scoord`` (linear layers, one
gate of the two directions' logits summed).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._act import get_act_layer
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._reduction import check_reduction_args, make_divisible
from ._registry import register_attention

__all__ = ["CoordAttn", "SimpleCoordAttn"]


def _width(channels: int, rd_ratio: float = 1.0 / 32, rd_divisor: int = 1, min_rd_channels: int = 8) -> int:
    """The official code's bottleneck width, ``mip = max(8, inp // reduction)``, in timm's terms:
    ``floor(channels * rd_ratio)`` rounded down to a multiple of ``rd_divisor``, at least
    ``min_rd_channels``.

    Example:
        >>> _width(320), _width(960)
        (10, 30)
    """
    # round() first: a ratio such as 1/3 is not exact in binary, and 96 * (1/3) must floor to 32.
    width = math.floor(round(channels * rd_ratio, 9)) // rd_divisor * rd_divisor
    return max(min_rd_channels, width)


@register_attention("coord")
class CoordAttn(nn.Module):
    """Coordinate Attention: average-pool along W and along H, a shared 1x1 bottleneck on
    both strips, then one gate per direction, ``x * a_h * a_w``.

    Arguments follow timm's ``CoordAttn``; the defaults are the paper's official code
    (biased convolutions, hard-swish, and its bottleneck width ``max(8, C // 32)``: the
    channels over the reduction 32, rounded down, at least 8; timm instead rounds
    ``C * rd_ratio * se_factor`` to the nearest multiple of 8). Where it differs: no
    BatchNorm after the shared convolution (its running statistics would break identity in
    train mode; timm and the paper have one), no ``se_factor`` (timm's extra width factor),
    and the gate form. ``scale(x)`` returns the product of both gates.

    Args:
        channels: input (and output) channels.
        rd_ratio: bottleneck width as a fraction of ``channels`` (the paper's 1 / reduction);
            the width is ``max(min_rd_channels, floor(channels * rd_ratio))``.
        rd_channels: bottleneck width; overrides ``rd_ratio``.
        rd_divisor: round the width from ``rd_ratio`` down to a multiple of this (before the floor
            of ``min_rd_channels``).
        min_rd_channels: the least width from ``rd_ratio`` (the official code's 8).
        bias: biases in the three 1x1 convolutions.
        act_layer: activation after the shared convolution (class or timm name).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 32,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        min_rd_channels: int = 8,
        bias: bool = True,
        act_layer: type[nn.Module] | str = nn.Hardswish,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        check_reduction_args("coord", {"rd_ratio": rd_ratio, "rd_channels": rd_channels, "rd_divisor": rd_divisor})
        if isinstance(min_rd_channels, bool) or not isinstance(min_rd_channels, int) or min_rd_channels < 1:
            raise AttentionError(f"coord: min_rd_channels = {min_rd_channels!r} is not valid: an integer >= 1")
        if rd_channels is None:
            rd_channels = _width(channels, rd_ratio, rd_divisor, min_rd_channels)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        self.act = get_act_layer("coord", act_layer)()
        self.conv_h = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.conv_w = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate both gate convolutions start at zero."""
        for conv in (self.conv1, self.conv_h, self.conv_w):
            conv.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.conv_h, self.conv_w)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two directional gates, shapes ``(N, C, H, 1)`` and ``(N, C, 1, W)``."""
        h, w = x.shape[-2:]
        x_h = x.mean(3, keepdim=True)  # (N, C, H, 1)
        x_w = x.mean(2, keepdim=True).transpose(2, 3)  # (N, C, W, 1)
        y = self.act(self.conv1(torch.cat([x_h, x_w], dim=2)))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = apply_gate(self.conv_h(y_h), self.gate)
        a_w = apply_gate(self.conv_w(y_w.transpose(2, 3)), self.gate)
        return a_h, a_w

    def scale(self, x: Tensor) -> Tensor:
        """The combined gate ``a_h * a_w``, shape ``(N, C, H, W)``."""
        a_h, a_w = self.gates(x)
        return a_h * a_w

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)


@register_attention("scoord")
class SimpleCoordAttn(nn.Module):
    """Simple coordinate attention (timm's ``scoord``): average-pool along W and along H, a
    shared linear bottleneck on both strips, one linear head per direction, and a single
    gate of their sum, ``x * gate(a_h + a_w)``.

    Not in the paper: timm's ``SimpleCoordAttn`` (linear layers, no norm, the two directions
    added before one gate instead of two gates multiplied), whose arguments, defaults and
    state-dict keys this module has (``fc1``, ``fc_h``, ``fc_w``, biased ``nn.Linear``;
    width ``make_divisible(channels * rd_ratio * se_factor, rd_divisor)``), so its weights
    load into it; ``gate="sigmoid"`` is timm's module exactly. The identity form starts
    ``fc_h`` and ``fc_w`` at zero under a ``2 * sigmoid`` gate, so the gate is exactly 1.0
    at init; the heads learn from the first step, ``fc1`` from the second. Where it
    differs: no ``has_skip`` (timm's option to add the input back, off by default: it would
    double the input at identity), and the gate form.

    Args:
        channels: input (and output) channels.
        rd_ratio: bottleneck width as a fraction of ``channels`` (before ``se_factor``).
        rd_channels: bottleneck width; overrides ``rd_ratio``.
        rd_divisor: round the bottleneck width to a multiple of this.
        se_factor: a further factor on ``rd_ratio`` (timm's, keeping the parameters near SE's).
        bias: biases in the three linear layers.
        act_layer: activation after the shared layer (class or timm name).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (timm's module).
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 0.25,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        se_factor: float = 2 / 3,
        bias: bool = True,
        act_layer: type[nn.Module] | str = nn.SiLU,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        check_reduction_args("scoord", {"rd_ratio": rd_ratio, "rd_channels": rd_channels, "rd_divisor": rd_divisor})
        if isinstance(se_factor, bool) or not isinstance(se_factor, (int, float)) or not se_factor > 0:
            raise AttentionError(f"scoord: se_factor = {se_factor!r} is not valid: a number > 0 (timm's 2/3)")
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio * se_factor, rd_divisor, round_limit=0.0)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(channels, rd_channels, bias=bias, **dd)
        self.act = get_act_layer("scoord", act_layer)()
        self.fc_h = nn.Linear(rd_channels, channels, bias=bias, **dd)
        self.fc_w = nn.Linear(rd_channels, channels, bias=bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate both heads start at zero."""
        for fc in (self.fc1, self.fc_h, self.fc_w):
            fc.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.fc_h, self.fc_w)

    def scale(self, x: Tensor) -> Tensor:
        """The gate of both directions' logits summed, shape ``(N, C, H, W)``."""
        y_h = self.act(self.fc1(x.mean(3).transpose(1, 2)))  # (N, H, rd)
        y_w = self.act(self.fc1(x.mean(2).transpose(1, 2)))  # (N, W, rd)
        a_h = self.fc_h(y_h).transpose(1, 2).unsqueeze(-1)  # (N, C, H, 1)
        a_w = self.fc_w(y_w).transpose(1, 2).unsqueeze(-2)  # (N, C, 1, W)
        return apply_gate(a_h + a_w, self.gate)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
