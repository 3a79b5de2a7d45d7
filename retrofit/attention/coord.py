"""Coordinate Attention.

Hou, Zhou, Feng: "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021,
arXiv:2103.02907.
"""

from __future__ import annotations

import torch
from timm.layers import get_act_layer, make_divisible
from torch import Tensor, nn

from ._gate import apply_gate, check_gate, zero_init_
from ._registry import register_attention

__all__ = ["CoordAttn"]


@register_attention("coord")
class CoordAttn(nn.Module):
    """Coordinate Attention: average-pool along W and along H, a shared 1x1 bottleneck on
    both strips, then one gate per direction, ``x * a_h * a_w``.

    Arguments follow timm's ``CoordAttn``; the defaults are the paper's official code
    (reduction 32 with a floor of 8 channels, biased convolutions, hard-swish). Where it
    differs: no BatchNorm after the shared convolution (its running statistics would break
    identity in train mode; timm and the paper have one), no ``se_factor`` (timm's extra
    width factor), and the gate form. ``scale(x)`` returns the product of both gates.

    Args:
        channels: input (and output) channels.
        rd_ratio: bottleneck width as a fraction of ``channels`` (the paper's 1 / reduction).
        rd_channels: bottleneck width; overrides ``rd_ratio``.
        rd_divisor: round the bottleneck width to a multiple of this (and at least this).
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
        rd_divisor: int = 8,
        bias: bool = True,
        act_layer: type[nn.Module] | str = nn.Hardswish,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        self.act = get_act_layer(act_layer)()
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
