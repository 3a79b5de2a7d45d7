"""Efficient Channel Attention.

Wang, Wu, Zhu, Li, Zuo, Hu: "ECA-Net: Efficient Channel Attention for Deep Convolutional
Neural Networks", CVPR 2020, arXiv:1910.03151.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._gate import apply_gate, check_gate, zero_init_
from ._registry import register_attention

__all__ = ["EfficientChannelAttn", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive kernel size: the odd number nearest |log2(C) + b| / gamma, at least 3."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


@register_attention("eca")
class EfficientChannelAttn(nn.Module):
    """ECA: global average pool, a 1-D convolution across channels, a channel gate.

    Arguments follow timm's ``EcaModule``. Where it differs: ``kernel_size=None`` (the
    default) means the paper's adaptive size from ``gamma`` and ``beta``, while an explicit
    ``kernel_size`` is used as given (timm ignores it whenever ``channels`` is set).

    Args:
        channels: input (and output) channels.
        kernel_size: odd kernel of the channel convolution; ``None`` for the adaptive size.
        gamma: gamma of the adaptive kernel size.
        beta: b of the adaptive kernel size.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        gamma: float = 2,
        beta: float = 1,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        if kernel_size is None:
            kernel_size = eca_kernel_size(channels, gamma, beta)
        elif (isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1
              or kernel_size % 2 == 0):
            raise AttentionError(f"eca: kernel_size = {kernel_size!r} is not valid: an odd integer >= 1, so every "
                                 "channel gets a gate (or leave it out for the paper's adaptive size)")
        self.conv = nn.Conv1d(
            1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, device=device, dtype=dtype
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate the convolution starts at zero."""
        self.conv.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.conv)

    def scale(self, x: Tensor) -> Tensor:
        """The per-channel gate, shape ``(N, C, 1, 1)``."""
        s = x.mean((2, 3)).unsqueeze(1)  # (N, 1, C): channels become the 1-D sequence
        s = self.conv(s)
        return apply_gate(s, self.gate).transpose(1, 2).unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
