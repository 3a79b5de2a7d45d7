"""Triplet Attention.

Misra, Nalamada, Arasanipalai, Hou: "Rotate to Attend: Convolutional Triplet Attention
Module", WACV 2021, arXiv:2010.03045; official code github.com/landskape-ai/triplet-attention
(``triplet_attention.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._registry import register_attention

__all__ = ["TripletAttn"]


def _zpool(x: Tensor, dim: int) -> Tensor:
    """The official Z-pool: max and mean over ``dim``, stacked (max first) as two channels."""
    return torch.stack([x.amax(dim), x.mean(dim)], dim=1)


@register_attention("triplet")
class TripletAttn(nn.Module):
    """Triplet attention: three CBAM-like spatial gates on the (C, W), (H, C) and (H, W)
    planes of the tensor, averaged.

    Each plane is pooled across the third axis (Z-pool: max and mean, stacked), a 7x7
    convolution and a sigmoid make its gate; the output is the mean of the three gated
    tensors, ``x * (g_hw + g_cw + g_hc) / 3``.

    Follows the official code (its ``TripletAttention``, with ``no_spatial``): the same
    planes in the same orientation (the ``(H, C)`` map has H as rows), the same Z-pool
    order, the branch names ``cw``, ``hc``, ``hw``. Where it differs: each branch's
    convolution has a bias and no BatchNorm after it (running statistics would break
    identity in train mode; in eval mode a BatchNorm is an affine map the convolution
    absorbs, which is how the oracle test compares the two), so a branch has ``2 * k * k + 1``
    parameters instead of ``2 * k * k + 2``; the official code permutes the tensor to gate
    each plane, this module pools along the plane's axis and broadcasts the gate (the same
    numbers, no copies). With ``gate="identity"`` the three convolutions start at zero and
    each gate is ``2 * sigma(0) = 1.0``; the mean of three ones divides three by three, 1.0
    exactly; all three learn from the first step. ``scale(x)`` returns the mean gate, shape
    ``(N, C, H, W)``.

    Args:
        channels: input (and output) channels.
        kernel_size: kernel of the three convolutions (odd; the official 7).
        no_spatial: leave out the ``(H, W)`` branch (the official option; the mean of two).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: an even or non-positive ``kernel_size``.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        no_spatial: bool = False,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise AttentionError(f"triplet: kernel_size = {kernel_size!r} is not valid: an odd integer >= 1, so "
                                 "each gate keeps its plane's size")
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.cw = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, **dd)
        self.hc = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, **dd)
        self.hw = None if no_spatial else nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate the three convolutions start at zero."""
        convs = [c for c in (self.cw, self.hc, self.hw) if c is not None]
        for conv in convs:
            conv.reset_parameters()
        if self.gate == "identity":
            zero_init_(*convs)

    def scale(self, x: Tensor) -> Tensor:
        """The mean of the branch gates, shape ``(N, C, H, W)``."""
        # (C, W) plane, pooled across H: a (N, 2, C, W) image, its gate back at (N, C, 1, W)
        g_cw = apply_gate(self.cw(_zpool(x, 2)), self.gate).permute(0, 2, 1, 3)
        # (H, C) plane, pooled across W: a (N, 2, H, C) image, its gate back at (N, C, H, 1)
        g_hc = apply_gate(self.hc(_zpool(x, 3).transpose(2, 3)), self.gate).permute(0, 3, 2, 1)
        if self.hw is None:
            return (g_cw + g_hc) / 2
        g_hw = apply_gate(self.hw(_zpool(x, 1)), self.gate)  # (N, 1, H, W)
        return (g_hw + g_cw + g_hc) / 3

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
