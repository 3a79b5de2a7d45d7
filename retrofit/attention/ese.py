"""Effective Squeeze-and-Excitation.

Lee, Park: "CenterMask: Real-Time Anchor-Free Instance Segmentation", CVPR 2020,
arXiv:1911.06667 (the eSE module of its VoVNetV2 backbone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._gate import check_gate, zero_init_
from ._registry import register_attention

__all__ = ["EffectiveSqueezeExcite"]


@register_attention("ese")
class EffectiveSqueezeExcite(nn.Module):
    """Effective SE: global average pool, one full-width 1x1 convolution, a hard-sigmoid
    channel gate (SE without the bottleneck, which loses channel information).

    Arguments, defaults and state-dict keys are timm's ``EffectiveSEModule`` (``fc`` is a
    biased ``C -> C`` 1x1 convolution), so VoVNetV2 / timm weights load into it. The paper's
    gate is the hard sigmoid, ``relu6(z + 3) / 6``: ``gate="sigmoid"`` selects it (the
    paper's and timm's module exactly). The identity form (the default) doubles that same
    gate, ``2 * relu6(z + 3) / 6``, with ``fc`` at zero: ``z == 0`` gives a gate of exactly
    ``2 * 0.5 == 1.0``; its slope there is ``1/3``, so ``fc`` learns from the first step.
    Where it differs: timm's extra ``**kwargs`` (ignored there) are refused here, and the
    gate form.

    Args:
        channels: input (and output) channels.
        add_maxpool: squeeze with the mean of global average and max pooling (timm's option).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper's hard
            sigmoid).
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        add_maxpool: bool = False,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        self.add_maxpool = add_maxpool
        self.fc = nn.Conv2d(channels, channels, 1, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate ``fc`` starts at zero."""
        self.fc.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.fc)

    def scale(self, x: Tensor) -> Tensor:
        """The per-channel gate, shape ``(N, C, 1, 1)``."""
        s = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            s = 0.5 * s + 0.5 * x.amax((2, 3), keepdim=True)
        g = F.hardsigmoid(self.fc(s))
        return g * 2.0 if self.gate == "identity" else g

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
