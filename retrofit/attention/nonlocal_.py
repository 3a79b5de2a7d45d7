"""Non-local block, embedded-Gaussian form.

Wang, Girshick, Gupta, He: "Non-local Neural Networks", CVPR 2018, arXiv:1711.07971.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._additive import check_additive_gate
from ._factory import FactoryKwargs
from ._gate import zero_init_
from ._reduction import reduced_channels
from ._registry import register_attention

__all__ = ["NonLocal"]


@register_attention("nonlocal")
class NonLocal(nn.Module):
    """Non-local block: every position attends to every position,
    ``x + W_z(softmax(theta(x)^T phi(x)) g(x))``, with 1x1 convolutions ``theta``, ``phi``,
    ``g`` (to ``rd_channels``) and ``W_z`` (back to ``channels``).

    Memory and compute are quadratic in ``H*W``: the attention matrix has
    ``(H*W) * (H*W')`` entries per image, where ``H*W'`` is ``H*W`` or, with ``sub_sample``,
    about a quarter of it (the paper's 2x2 max-pooling after ``phi`` and ``g``). At 56x56 that
    is 39 MB per image in float32 without sub-sampling; use it on small maps (the built-in
    rules take only maps of at most 14x14).

    Arguments follow timm's ``NonLocalAttn`` (``rd_ratio=1/8``; the paper halves the
    channels). Where it differs: ``W_z`` is a biased convolution that starts at zero
    instead of the paper's convolution + BatchNorm with zero scale (same identity at init,
    no running statistics), the scores are scaled by ``rd_channels ** -0.5`` when
    ``use_scale`` (timm scales by ``channels ** -0.5``, the paper not at all), and the
    sub-sampling window shrinks to 1 along a side of length 1. There is no sigmoid gate:
    ``gate="sigmoid"`` raises; ``delta(x)`` returns the added term.

    Args:
        channels: input (and output) channels.
        rd_ratio: embedding width as a fraction of ``channels``.
        rd_channels: embedding width; overrides ``rd_ratio``.
        rd_divisor: round the embedding width to a multiple of this (and at least this).
        use_scale: scale the dot products by ``rd_channels ** -0.5``.
        sub_sample: 2x2 max-pool the keys and values (``phi`` and ``g``).
        gate: ``"identity"`` only (the output projection starts at zero).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: ``gate="sigmoid"``.
    """

    fused_gates = ()  # forward is x + delta(x), no product of gates: nothing to fuse, no gate to record

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 8,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        use_scale: bool = True,
        sub_sample: bool = False,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_additive_gate("nonlocal", gate)
        rd_channels = reduced_channels("nonlocal", channels, rd_ratio, rd_channels, rd_divisor)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.score_scale = rd_channels**-0.5 if use_scale else 1.0
        self.sub_sample = sub_sample
        self.theta = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.phi = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.g = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.out = nn.Conv2d(rd_channels, channels, 1, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; the output projection starts at zero."""
        for conv in (self.theta, self.phi, self.g, self.out):
            conv.reset_parameters()
        zero_init_(self.out)

    def _pool(self, t: Tensor) -> Tensor:
        if not self.sub_sample:
            return t
        k = (min(2, t.shape[-2]), min(2, t.shape[-1]))
        return F.max_pool2d(t, k, stride=k, ceil_mode=True)

    def delta(self, x: Tensor) -> Tensor:
        """The added term ``W_z(y)``, shape ``(N, C, H, W)``."""
        n, _, h, w = x.shape
        q = self.theta(x).flatten(2)  # (N, D, HW)
        k = self._pool(self.phi(x)).flatten(2)  # (N, D, HW')
        v = self._pool(self.g(x)).flatten(2)  # (N, D, HW')
        attn = torch.bmm(q.transpose(1, 2), k).mul_(self.score_scale).softmax(dim=-1)  # (N, HW, HW')
        y = torch.bmm(v, attn.transpose(1, 2))  # (N, D, HW)
        return self.out(y.reshape(n, -1, h, w))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.delta(x)
