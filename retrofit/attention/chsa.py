"""Channel self-attention: multi-head attention across channels, not pixels.

The mechanism is that of DANet's channel attention module (Fu, Liu, Tian, Li, Bao, Fang,
Lu: "Dual Attention Network for Scene Segmentation", CVPR 2019, arXiv:1809.02983), built
from ``nn.MultiheadAttention`` with learned projections and several heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AttentionError
from ._additive import check_additive_gate
from ._factory import FactoryKwargs
from ._gate import zero_init_
from ._registry import register_attention

__all__ = ["ChannelSelfAttn"]


@register_attention("chsa")
class ChannelSelfAttn(nn.Module):
    """Channel self-attention: each channel is one token, its map average-pooled to
    ``pool_size`` x ``pool_size`` and flattened (so any H x W gives ``pool_size ** 2``
    features per token); the tokens are normalized together (GroupNorm with one group, so
    channels keep their relative magnitudes), attend to each other with
    ``nn.MultiheadAttention``, and each channel's output token, read back as a
    ``pool_size`` x ``pool_size`` map and resized to H x W (averaged down, bilinear up), is added
    to the channel: ``x + resize(attn(norm(pool(x))))``.

    Where it differs from DANet's channel attention: the channel affinities come from
    learned query and key projections of pooled maps (DANet uses the raw full-resolution
    Gram matrix ``X X^T`` and mixes full-resolution maps), and the added term is the
    attention's pooled-resolution output, resized. Instead of DANet's zero-initialized
    scale ``beta``, the attention's output projection starts at zero, so every other
    parameter learns from the second step on. Compute is quadratic in ``channels``
    (``2 * C^2 * pool_size^2`` multiply-adds per image for the attention itself). There
    is no sigmoid gate: ``gate="sigmoid"`` raises; ``delta(x)`` returns the added term.

    Args:
        channels: input (and output) channels, the number of tokens.
        pool_size: side of the grid each channel's map is pooled to; the token width is
            its square.
        num_heads: attention heads; must divide ``pool_size ** 2``. One (the default) is
            DANet's single channel affinity; more heads cost more memory (one ``C x C``
            matrix each) for the same FLOPs.
        qkv_bias: biases in the attention's input and output projections.
        gate: ``"identity"`` only (the output projection starts at zero).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: ``gate="sigmoid"``, or ``num_heads`` does not divide the token width.
    """

    fused_gates = ()  # forward is x + delta(x), no product of gates: nothing to fuse, no gate to record

    def __init__(
        self,
        channels: int,
        pool_size: int = 8,
        num_heads: int = 1,
        qkv_bias: bool = True,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_additive_gate("chsa", gate)
        if pool_size < 1 or num_heads < 1 or pool_size**2 % num_heads:
            raise AttentionError(
                f"chsa: num_heads = {num_heads} must divide the token width pool_size ** 2 = {pool_size**2}"
            )
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.pool_size = pool_size
        self.norm = nn.GroupNorm(1, channels, **dd)
        self.attn = nn.MultiheadAttention(pool_size**2, num_heads, bias=qkv_bias, batch_first=True, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; the attention's output projection starts at zero."""
        self.norm.reset_parameters()
        self.attn._reset_parameters()
        zero_init_(self.attn.out_proj)

    def delta(self, x: Tensor) -> Tensor:
        """The added term, shape ``(N, C, H, W)``."""
        n, c, h, w = x.shape
        p = self.pool_size
        tokens = self.norm(F.adaptive_avg_pool2d(x, p)).flatten(2)  # (N, C, p*p)
        y, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        y = y.reshape(n, c, p, p)
        if h < p or w < p:  # shrink by averaging
            y = F.adaptive_avg_pool2d(y, (min(h, p), min(w, p)))
        if y.shape[-2:] != (h, w):  # grow by bilinear interpolation
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return y

    def forward(self, x: Tensor) -> Tensor:
        return x + self.delta(x)
