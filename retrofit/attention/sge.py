"""Spatial Group-wise Enhance.

Li, Hu, Yang: "Spatial Group-wise Enhance: Improving Semantic Feature Learning in
Convolutional Networks", arXiv:1905.09646; official code github.com/implus/PytorchInsight
(``classification/models/imagenet/resnet_sge.py``, ``SpatialGroupEnhance``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._constraints import check_positive_int, groups_problem
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._registry import register_attention

__all__ = ["SpatialGroupEnhance"]


@register_attention("sge")
class SpatialGroupEnhance(nn.Module):
    """SGE: in each channel group, every position's similarity to the group's mean feature,
    normalised, gives a spatial gate shared by the group's channels.

    The similarity is the dot product over the group's channels, normalised over the
    positions (mean 0, standard deviation 1) to ``t``; one weight and bias per group make
    the gate ``sigma(w * t + b)``.

    Follows the official code: the same two parameters (``weight`` and ``bias``, shape
    ``(1, groups, 1, 1)``; its weights load), the unbiased standard deviation with its
    1e-5 added after the square root, the paper's init (weight 0, bias 1). Where it
    differs: the identity form, whose bias starts at zero too, so that the gate is
    ``2 * sigma(0) = 1.0``; both learn from the first step. A 1x1 map (one position, whose
    unbiased deviation the official code divides by zero into NaN) normalises to 0. A site
    whose channels ``groups`` does not divide is skipped (``site_problem``). ``scale(x)``
    returns the gate, shape ``(N, C, H, W)``.

    Args:
        channels: input (and output) channels; divisible by ``groups``.
        groups: number of channel groups (the official 64).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: ``groups`` is no integer >= 1 or does not divide ``channels``.
    """

    constraints = "channels divisible by groups (64 by default)"
    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    @classmethod
    def site_problem(cls, channels: int, size: tuple[int, int], groups: int = 64, **_: object) -> str | None:
        """Why a site of ``channels`` cannot take SGE (its groups do not divide them), or None."""
        return groups_problem(channels, groups, "groups")

    def __init__(
        self,
        channels: int,
        groups: int = 64,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        self.groups = check_positive_int("sge", "groups", groups)
        why = groups_problem(channels, groups, "groups")
        if why is not None:
            raise AttentionError(f"sge: {why}; choose groups that divide them")
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(1, groups, 1, 1, **dd))
        self.bias = nn.Parameter(torch.empty(1, groups, 1, 1, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init (weight 0, bias 1); with the identity gate the bias starts at 0."""
        if self.gate == "identity":
            zero_init_(self.weight, self.bias)
        else:
            nn.init.zeros_(self.weight)
            nn.init.ones_(self.bias)

    def scale(self, x: Tensor) -> Tensor:
        """The gate, shape ``(N, C, H, W)``."""
        b, c, h, w = x.shape
        g = x.reshape(b * self.groups, c // self.groups, h, w)
        t = (g * g.mean((2, 3), keepdim=True)).sum(1).reshape(b * self.groups, h * w)
        t = t - t.mean(1, keepdim=True)
        # unbiased, as the official code; one position has no deviation (0, not 0 / 0)
        std = t.std(1, keepdim=True, correction=1 if h * w > 1 else 0) + 1e-5
        t = (t / std).reshape(b, self.groups, h, w)
        s = apply_gate(t * self.weight + self.bias, self.gate).reshape(b, self.groups, 1, h, w)
        return s.expand(b, self.groups, c // self.groups, h, w).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
