"""Efficient Multi-Scale Attention.

Ouyang, He, Zhang, Luo, Guo, Zhan, Huang: "Efficient Multi-Scale Attention Module with
Cross-Spatial Learning", ICASSP 2023, arXiv:2305.13563; official code
github.com/YOLOonMe/EMA-attention-module (``EMA_attention_module``, the ``EMA`` class).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._constraints import check_positive_int, groups_problem
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._registry import register_attention

__all__ = ["EfficientMultiScaleAttn"]


@register_attention("ema")
class EfficientMultiScaleAttn(nn.Module):
    """EMA: in each of ``factor`` channel groups, a 1x1 branch (gates along H and W, then
    GroupNorm) and a 3x3 branch weight each other's maps: one spatial gate per group.

    In detail: the 1x1 branch pools the group along H and along W, a shared 1x1 convolution
    and two sigmoids make coordinate-attention-like gates, then GroupNorm; each branch's
    globally pooled channel descriptor (softmax over the group's channels) weights the
    other branch's map, and the sum is the gate's logit ``w``: ``x * sigma(w)``.

    Follows the official code: the same layers and state-dict keys (``gn``, ``conv1x1``,
    ``conv3x3``; its weights load), the same operations. Where it differs: the identity
    form. The gate logit is ``w = softmax(pool(x1)) . x2 + softmax(pool(x2)) . x1`` (x1 the
    GroupNorm output, x2 the 3x3 convolution's); with ``gate="identity"`` the 3x3
    convolution and the GroupNorm's affine weight and bias start at zero, so ``x1 = x2 = 0``,
    ``w = 0`` and the gate ``2 * sigma(0)`` is exactly 1.0. Both get gradient at once (the
    other factor of each product is a softmax), the 1x1 branch from the second step. The
    official code asserts the group count only; the channels must also divide into it,
    and a site where they do not is skipped (``site_problem``). ``scale(x)`` returns the
    gate, shape ``(N, C, H, W)`` (one value per group and position, repeated over the
    group's channels).

    Args:
        channels: input (and output) channels; divisible by ``factor``.
        factor: number of channel groups (the official code's ``factor``, 32 by default).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: ``factor`` is no integer >= 1 or does not divide ``channels``.
    """

    constraints = "channels divisible by factor (32 by default)"
    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    @classmethod
    def site_problem(cls, channels: int, size: tuple[int, int], factor: int = 32, **_: object) -> str | None:
        """Why a site of ``channels`` cannot take EMA (its groups do not divide them), or None."""
        return groups_problem(channels, factor, "factor")

    def __init__(
        self,
        channels: int,
        factor: int = 32,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        self.groups = check_positive_int("ema", "factor", factor)
        why = groups_problem(channels, factor, "factor")
        if why is not None:
            raise AttentionError(f"ema: {why}; choose a factor that divides them")
        width = channels // factor
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.gn = nn.GroupNorm(width, width, **dd)  # one group per channel: each map normalised alone
        self.conv1x1 = nn.Conv2d(width, width, 1, **dd)
        self.conv3x3 = nn.Conv2d(width, width, 3, padding=1, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init (the official code's); with the identity gate the 3x3
        convolution and the GroupNorm's affine parameters start at zero."""
        self.gn.reset_parameters()
        self.conv1x1.reset_parameters()
        self.conv3x3.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.conv3x3, self.gn)

    def logits(self, x: Tensor) -> Tensor:
        """The gate's logit per group and position, shape ``(N * factor, 1, H, W)``."""
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, c // self.groups, h, w)
        x_h = g.mean(3, keepdim=True)  # (bg, c/g, H, 1)
        x_w = g.mean(2, keepdim=True).permute(0, 1, 3, 2)  # (bg, c/g, W, 1)
        hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))
        x_h, x_w = torch.split(hw, [h, w], dim=2)
        x1 = self.gn(g * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())
        x2 = self.conv3x3(g)
        # each branch's channel descriptor, softmax over the group's channels: (bg, 1, c/g)
        a1 = x1.mean((2, 3)).unsqueeze(1).softmax(-1)
        a2 = x2.mean((2, 3)).unsqueeze(1).softmax(-1)
        weights = torch.matmul(a1, x2.flatten(2)) + torch.matmul(a2, x1.flatten(2))  # (bg, 1, HW)
        return weights.reshape(b * self.groups, 1, h, w)

    def scale(self, x: Tensor) -> Tensor:
        """The gate, shape ``(N, C, H, W)``."""
        b, c, h, w = x.shape
        s = apply_gate(self.logits(x), self.gate).reshape(b, self.groups, 1, h, w)
        return s.expand(b, self.groups, c // self.groups, h, w).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
