"""Mixed Local Channel Attention.

Wan et al.: "Mixed local channel attention for object detection", Engineering Applications
of Artificial Intelligence 123 (2023) 106442 (the paper has no arXiv id); official code
github.com/wandahangFY/MLCA (``MLCA.py``).
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AttentionError
from ._constraints import check_positive_int
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._registry import register_attention

__all__ = ["MixedLocalChannelAttn", "mlca_kernel_size"]


def mlca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The official code's kernel: ECA's odd number nearest ``|log2(C) + b| / gamma``, without
    ECA's floor of 3 (1 for fewer than 8 channels).

    Example:
        >>> mlca_kernel_size(4), mlca_kernel_size(64), mlca_kernel_size(256)
        (1, 3, 5)
    """
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return t if t % 2 else t + 1


@register_attention("mlca")
class MixedLocalChannelAttn(nn.Module):
    """MLCA: ECA-style channel gates on a 5x5 grid of local averages and on the global
    average, mixed and stretched back to H x W.

    The map is average-pooled to a ``local_size`` x ``local_size`` grid (local) and to one
    value (global) per channel; a 1-D convolution across channels runs on each (the local
    one over the grid cells' channel vectors laid end to end, cell by cell); the two sigmoid
    gates are mixed, ``(1 - w) * global + w * local``, and stretched back to H x W by
    adaptive average pooling: ``x * gate``.

    Follows the official code: the same two convolutions and state-dict keys (``conv``,
    ``conv_local``; its weights load), the global descriptor taken from the local grid, the
    same cell-major sequence (the local convolution also runs across neighbouring cells'
    channels, as the official reshape lays them out) and the same un-pooling. Where it
    differs: the mix is written ``global + w * (local - global)`` (the same up to one
    rounding) so that two gates of exactly 1.0 mix to exactly 1.0 for any ``w``; and the
    identity form: both convolutions start at zero and each gate is ``2 * sigma(0) = 1.0``
    (an average of ones is one), both learning from the first step. ``scale(x)`` returns the
    gate, shape ``(N, C, H, W)``.

    Args:
        channels: input (and output) channels.
        local_size: side of the local grid.
        gamma: gamma of the adaptive kernel size.
        beta: b of the adaptive kernel size.
        local_weight: weight ``w`` of the local gate in the mix, in [0, 1].
        kernel_size: odd kernel of both convolutions; ``None`` for the adaptive size
            (:func:`mlca_kernel_size`).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: a ``local_size`` below 1, a ``local_weight`` outside [0, 1], or an
            even ``kernel_size``.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        local_size: int = 5,
        gamma: float = 2,
        beta: float = 1,
        local_weight: float = 0.5,
        kernel_size: int | None = None,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        self.local_size = check_positive_int("mlca", "local_size", local_size)
        if isinstance(local_weight, bool) or not isinstance(local_weight, Real) or not 0 <= float(local_weight) <= 1:
            raise AttentionError(f"mlca: local_weight = {local_weight!r} is not valid: the local gate's share of "
                                 "the mix, a number in [0, 1]")
        self.local_weight: float = float(local_weight)
        if kernel_size is None:
            kernel_size = mlca_kernel_size(channels, gamma, beta)
        elif check_positive_int("mlca", "kernel_size", kernel_size) % 2 == 0:
            raise AttentionError(f"mlca: kernel_size = {kernel_size} is not valid: an odd integer >= 1 (or leave "
                                 "it out for the adaptive size)")
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.conv: nn.Conv1d = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, **dd)
        self.conv_local: nn.Conv1d = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate both convolutions start at zero."""
        self.conv.reset_parameters()
        self.conv_local.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.conv, self.conv_local)

    def scale(self, x: Tensor) -> Tensor:
        """The gate, shape ``(N, C, H, W)``."""
        b, c, h, w = x.shape
        k = self.local_size
        local = F.adaptive_avg_pool2d(x, k)  # (N, C, k, k)
        glob = local.mean((2, 3))  # (N, C): the official global pool of the local grid
        # cell by cell, each cell's C channels: one sequence of k*k*C values
        y_local = self.conv_local(local.reshape(b, c, k * k).transpose(1, 2).reshape(b, 1, k * k * c))
        y_global = self.conv(glob.unsqueeze(1))  # (N, 1, C)
        att_local = apply_gate(y_local.reshape(b, k * k, c).transpose(1, 2).reshape(b, c, k, k), self.gate)
        att_global = apply_gate(y_global.reshape(b, c, 1, 1), self.gate)
        mix = att_global + self.local_weight * (att_local - att_global)
        return F.adaptive_avg_pool2d(mix, (h, w))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
