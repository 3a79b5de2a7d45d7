"""Shuffle Attention.

Zhang, Yang: "SA-Net: Shuffle Attention for Deep Convolutional Neural Networks", ICASSP
2021, arXiv:2102.00240; official code github.com/wofmanaf/SA-Net (``models/sa_resnet.py``,
``sa_layer``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._constraints import check_positive_int, groups_problem
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._registry import register_attention

__all__ = ["ShuffleAttn"]


@register_attention("shuffle")
class ShuffleAttn(nn.Module):
    """Shuffle attention: channel groups, each split in two halves, one with a channel gate
    and one with a spatial gate, then a channel shuffle.

    The channel half's gate is ``sigma(w_c * mean(x) + b_c)``, the spatial half's
    ``sigma(w_s * GN(x) + b_s)`` (one weight and bias per channel of the half).

    Follows the official code: the same parameters and state-dict keys (``cweight``,
    ``cbias``, ``sweight``, ``sbias``, ``gn``; its weights load) and, with
    ``gate="sigmoid"``, its output. Where it differs: the identity form. The channel
    shuffle is a fixed permutation that no training undoes, and the layers after an
    inserted module expect their channels in order, so the identity form does not shuffle
    (``shuffle=None`` means: shuffle in the paper form only); its biases start at zero
    (the paper's at one) and the gates are ``2 * sigma(0) = 1.0``. The weights start at
    zero in both forms, as in the official code: weights and biases learn from the first
    step, the GroupNorm's affine parameters from the second. ``scale(x)``
    returns the gate, shape ``(N, C, H, W)``, before the shuffle; with a shuffle the forward
    is no product of gates and nothing fuses.

    Args:
        channels: input (and output) channels; divisible by ``2 * groups``.
        groups: number of channel groups (the official 64).
        shuffle: shuffle the two halves' channels after gating (the paper); default: in the
            sigmoid form only. ``shuffle=True`` with the identity gate is no identity.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: ``groups`` is no integer >= 1, or ``2 * groups`` does not divide
            ``channels``.
    """

    constraints = "channels divisible by 2 * groups (128 at the default 64 groups)"
    __jit_unused_properties__ = ["fused_gates"]  # torch.jit.script: not part of forward

    @classmethod
    def site_problem(cls, channels: int, size: tuple[int, int], groups: int = 64, **_: object) -> str | None:
        """Why a site of ``channels`` cannot take shuffle attention, or None."""
        return groups_problem(channels, groups, "groups", multiple=2)

    def __init__(
        self,
        channels: int,
        groups: int = 64,
        shuffle: bool | None = None,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        self.groups = check_positive_int("shuffle", "groups", groups)
        why = groups_problem(channels, groups, "groups", multiple=2)
        if why is not None:
            raise AttentionError(f"shuffle: {why}; choose groups so that 2 * groups divides them")
        if shuffle is not None and not isinstance(shuffle, bool):
            raise AttentionError(f"shuffle: shuffle = {shuffle!r} is not valid: true, false, or leave it out")
        self.shuffle = self.gate == "sigmoid" if shuffle is None else shuffle
        half = channels // (2 * groups)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.cweight = nn.Parameter(torch.empty(1, half, 1, 1, **dd))
        self.cbias = nn.Parameter(torch.empty(1, half, 1, 1, **dd))
        self.sweight = nn.Parameter(torch.empty(1, half, 1, 1, **dd))
        self.sbias = nn.Parameter(torch.empty(1, half, 1, 1, **dd))
        self.gn = nn.GroupNorm(half, half, **dd)  # one group per channel
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init (weights 0, biases 1, GroupNorm 1 and 0); with the identity gate
        the biases start at zero too."""
        self.gn.reset_parameters()
        nn.init.zeros_(self.cweight)
        nn.init.zeros_(self.sweight)
        if self.gate == "identity":
            zero_init_(self.cweight, self.cbias, self.sweight, self.sbias)
        else:
            nn.init.ones_(self.cbias)
            nn.init.ones_(self.sbias)

    @property
    def fused_gates(self) -> tuple[str, ...]:
        """``("scale",)`` without the shuffle (forward is then ``x * scale(x)``), else ``()``."""
        return () if self.shuffle else ("scale",)

    def scale(self, x: Tensor) -> Tensor:
        """The gate before the shuffle, shape ``(N, C, H, W)``."""
        b, c, h, w = x.shape
        x0, x1 = x.reshape(b * self.groups, c // self.groups, h, w).chunk(2, dim=1)
        gc = apply_gate(self.cweight * x0.mean((2, 3), keepdim=True) + self.cbias, self.gate)
        gs = apply_gate(self.sweight * self.gn(x1) + self.sbias, self.gate)
        return torch.cat([gc.expand_as(x0), gs], dim=1).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        out = x * self.scale(x)
        if not self.shuffle:
            return out
        b, c, h, w = out.shape
        # the official channel_shuffle(out, 2): channel i of half k goes to 2 * i + k
        return out.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
