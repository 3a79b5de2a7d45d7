"""Efficient Local Attention, as timm builds it.

Xu, Wan: "ELA: Efficient Local Attention for Deep Convolutional Neural Networks", 2024,
arXiv:2403.01123.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._act import get_act_layer
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._registry import register_attention

__all__ = ["EfficientLocalAttn"]


def _groups_problem(channels: int, norm_groups: int) -> str | None:
    if channels % norm_groups:
        return (f"{channels} channels are not divisible by norm_groups = {norm_groups} (the GroupNorm's groups); "
                "give norm_groups a divisor of the channels (1 always fits)")
    return None


@register_attention("ela")
class EfficientLocalAttn(nn.Module):
    """ELA: average-pool along W and along H (no channel reduction), a depthwise 1-D
    convolution along each strip, a GroupNorm and an activation, then one gate per
    direction, ``x * a_h * a_w``.

    Arguments, defaults and state-dict keys are timm's ``EfficientLocalAttn`` (``conv_h``,
    ``conv_w``: depthwise ``k x 1`` and ``1 x k`` convolutions without bias; ``norm_h``,
    ``norm_w``: one-group GroupNorms), so its weights load into it; ``gate="sigmoid"`` is
    timm's module exactly. timm departs from the paper's code, and so does this module: the
    paper shares one convolution and one GroupNorm (16 groups) between the two directions
    and has no activation before the sigmoid; timm has one of each per direction, one-group
    GroupNorms and SiLU. timm's ``norm_layer`` is ``norm_groups`` here: 1 (the default) is
    timm's ``GroupNorm1``, 16 the paper's groups, None no norm.

    The identity form puts both gates under ``2 * sigmoid`` and starts the norms' weight and
    bias at zero (without norms: the convolutions), so the norms output exactly 0, the
    activation maps it to 0 and both gates are exactly 1.0; the norms learn from the first
    step, the convolutions from the second. That needs an activation with ``f(0) = 0``
    (SiLU, ReLU, GELU, hard-swish, ...): another is refused in the identity form. Where it
    differs from timm: no ``has_skip`` (timm's option to add the input back, off by default:
    it would double the input at identity), and the gate form. ``scale(x)`` returns the
    product of both gates, ``gates(x)`` each.

    Args:
        channels: input (and output) channels.
        kernel_size: odd kernel of the two strip convolutions.
        bias: biases in the strip convolutions.
        act_layer: activation after each norm (class or timm name).
        norm_groups: groups of each GroupNorm (must divide ``channels``); None: no norm.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (timm's module).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: an even kernel, ``norm_groups`` that does not divide ``channels``
            (the plan skips such a site, see :meth:`site_problem`), or in the identity form
            an activation that does not map 0 to 0.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add
    constraints = "channels divisible by norm_groups (GroupNorm groups; 1 by default)"

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        bias: bool = False,
        act_layer: type[nn.Module] | str = nn.SiLU,
        norm_groups: int | None = 1,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise AttentionError(f"ela: kernel_size = {kernel_size!r} is not valid: an odd integer >= 1, so the "
                                 "gates keep the map's size")
        if norm_groups is not None:
            if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1:
                raise AttentionError(f"ela: norm_groups = {norm_groups!r} is not valid: an integer >= 1 that "
                                     "divides the channels, or None for no norm")
            problem = _groups_problem(channels, norm_groups)
            if problem is not None:
                raise AttentionError(f"ela: {problem}")
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        pad = kernel_size // 2
        self.conv_h = nn.Conv2d(channels, channels, (kernel_size, 1), padding=(pad, 0), groups=channels, bias=bias,
                                **dd)
        self.conv_w = nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, pad), groups=channels, bias=bias,
                                **dd)
        self.norm_h: nn.Module = nn.Identity() if norm_groups is None else nn.GroupNorm(norm_groups, channels, **dd)
        self.norm_w: nn.Module = nn.Identity() if norm_groups is None else nn.GroupNorm(norm_groups, channels, **dd)
        self.act = get_act_layer("ela", act_layer)()
        if self.gate == "identity":
            with torch.no_grad():
                at_zero = self.act(torch.zeros(1)).item()
            if at_zero != 0.0:
                raise AttentionError(
                    f"ela: act_layer {type(self.act).__name__} maps 0 to {at_zero:g}, so the identity form cannot "
                    "start its gates at 1.0; use an activation with f(0) = 0 (silu, relu, gelu, hard_swish) or "
                    "gate='sigmoid'"
                )
        self.reset_parameters()

    @classmethod
    def site_problem(cls, channels: int, size: tuple[int, int], norm_groups: int | None = 1,
                     **_: object) -> str | None:
        """Why a site of ``channels`` and ``size`` cannot take this module (groups that do not
        divide the channels, or a group that would normalise a single value), or None."""
        if not isinstance(norm_groups, int) or isinstance(norm_groups, bool) or norm_groups < 1:
            return None  # no norm fits every site; a wrong value is the constructor's to name
        why = _groups_problem(channels, norm_groups)
        if why is None and channels // norm_groups * min(size) < 2:
            why = (f"a {size[0]}x{size[1]} map with {channels // norm_groups} channel(s) per GroupNorm group leaves "
                   "one value to normalise in a strip (GroupNorm needs two); give norm_groups=None")
        return why

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate the norms (or, without norms, the
        convolutions) start at zero."""
        for m in (self.conv_h, self.conv_w, self.norm_h, self.norm_w):
            if isinstance(m, (nn.Conv2d, nn.GroupNorm)):
                m.reset_parameters()
        if self.gate == "identity":
            if isinstance(self.norm_h, nn.GroupNorm):
                zero_init_(self.norm_h, self.norm_w)
            else:
                zero_init_(self.conv_h, self.conv_w)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The two directional gates, shapes ``(N, C, H, 1)`` and ``(N, C, 1, W)``."""
        a_h = self.act(self.norm_h(self.conv_h(x.mean(3, keepdim=True))))
        a_w = self.act(self.norm_w(self.conv_w(x.mean(2, keepdim=True))))
        return apply_gate(a_h, self.gate), apply_gate(a_w, self.gate)

    def scale(self, x: Tensor) -> Tensor:
        """The combined gate ``a_h * a_w``, shape ``(N, C, H, W)``."""
        a_h, a_w = self.gates(x)
        return a_h * a_w

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
