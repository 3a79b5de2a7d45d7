"""Point-wise Spatial Attention, bi-directional (collect and distribute).

Zhao, Zhang, Liu, Shi, Loy, Lin, Jia: "PSANet: Point-wise Spatial Attention Network for
Scene Parsing", ECCV 2018. The paper has no arXiv id; official code
github.com/hszhao/semseg (``model/psanet.py``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AttentionError
from ._act import get_act_layer
from ._additive import check_additive_gate
from ._factory import FactoryKwargs
from ._gate import zero_init_
from ._reduction import reduced_channels
from ._registry import register_attention

__all__ = ["PointwiseSpatialAttn"]


@functools.cache
def _relative_index(h: int, w: int, mask_size: int) -> Tensor:
    """``idx[p, q]``: where in a ``(2M-1) x (2M-1)`` mask centred on position ``p`` position
    ``q`` of an ``h x w`` map falls (flattened), for ``h, w <= M``."""
    k = 2 * mask_size - 1
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    hh, ww = hh.flatten(), ww.flatten()
    dh = hh[None, :] - hh[:, None] + mask_size - 1
    dw = ww[None, :] - ww[:, None] + mask_size - 1
    return dh * k + dw  # (HW, HW)


def _branch(channels: int, rd_channels: int, masks: int, act: type[nn.Module], dd: FactoryKwargs) -> nn.ModuleDict:
    return nn.ModuleDict({
        "reduce": nn.Sequential(nn.Conv2d(channels, rd_channels, 1, **dd), act()),
        "mask": nn.Sequential(nn.Conv2d(rd_channels, rd_channels, 1, **dd), act(),
                              nn.Conv2d(rd_channels, masks, 1, **dd)),
    })


@register_attention("psa")
class PointwiseSpatialAttn(nn.Module):
    """Point-wise spatial attention: every position predicts an over-complete
    ``(2M-1) x (2M-1)`` mask of relative weights (M = ``mask_size``); the H x W part centred
    on it holds that position's logit for every position of the map. The *collect* branch
    gathers at each position the features of all positions, weighted by its own mask
    normalized over the positions it reads (softmax over the targets). The *distribute*
    branch spreads each position's features to all positions, weighted by the spreading
    position's mask; as in the official code (``psamask`` in distribute mode, then a softmax
    over the positions that spread to a target), the weights arriving at one target are
    normalized over the spreading positions. Both branches (each with its own 1x1
    reduction to ``rd_channels``) are concatenated, projected back to ``channels`` and added:
    ``x + proj([collect, distribute])``.

    Memory and compute are quadratic in ``H*W``: each branch builds an ``(H*W) x (H*W)``
    attention per image. As a safeguard, maps larger than ``mask_size`` on a side are
    average-pooled to at most ``mask_size`` x ``mask_size`` first (the paper's
    ``shrink_factor``, chosen from the size) and the result is resized back (bilinear), so
    the cost is bounded by ``mask_size ** 4`` per image and branch, at any input size.

    Where it differs from the paper: the module adds its output to ``x`` through a
    zero-initialized 1x1 projection (PSANet concatenates it with ``x`` as a head and
    projects with conv + BatchNorm + ReLU); no BatchNorm anywhere (running statistics would
    break identity in train mode); the mask size is fixed at construction and the map is
    pooled to fit it (PSANet ties it to the feature size). There is no sigmoid gate:
    ``gate="sigmoid"`` raises; ``delta(x)`` returns the added term.

    Args:
        channels: input (and output) channels.
        rd_ratio: width of each branch as a fraction of ``channels`` (the paper: 512 for 2048).
        rd_channels: width of each branch; overrides ``rd_ratio``.
        rd_divisor: round the width to a multiple of this (and at least this).
        mask_size: largest side attention runs at; larger maps are pooled down to it.
        act_layer: activation after the reductions and in the mask predictors.
        gate: ``"identity"`` only (the output projection starts at zero).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: ``gate="sigmoid"``, or ``mask_size < 1``.
    """

    fused_gates = ()  # forward is x + delta(x), no product of gates: nothing to fuse, no gate to record

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 8,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        mask_size: int = 14,
        act_layer: type[nn.Module] | str = nn.ReLU,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_additive_gate("psa", gate)
        if mask_size < 1:
            raise AttentionError(f"psa: mask_size = {mask_size} must be at least 1")
        rd_channels = reduced_channels("psa", channels, rd_ratio, rd_channels, rd_divisor)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        act = get_act_layer("psa", act_layer)
        self.mask_size = mask_size
        masks = (2 * mask_size - 1) ** 2
        self.collect = _branch(channels, rd_channels, masks, act, dd)
        self.distribute = _branch(channels, rd_channels, masks, act, dd)
        self.proj = nn.Conv2d(2 * rd_channels, channels, 1, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; the output projection starts at zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        zero_init_(self.proj)

    def logits(self, branch: nn.ModuleDict, y: Tensor) -> Tensor:
        """``l[n, p, q]``: position ``p``'s mask value for position ``q``, shape ``(N, HW, HW)``
        (the official ``psamask`` output, indexed [owner, target])."""
        n, _, h, w = y.shape
        masks = branch["mask"](y).flatten(2).transpose(1, 2)  # (N, HW, (2M-1)^2), row p: p's mask
        idx = _relative_index(h, w, self.mask_size).to(y.device)
        return masks.gather(2, idx.expand(n, -1, -1))

    def attention(self, branch: nn.ModuleDict, y: Tensor) -> Tensor:
        """``a[n, p, q]``: the weight of position ``p``'s mask entry for position ``q``, shape
        ``(N, HW, HW)``. Collect normalizes each owner's row over its targets ``q``;
        distribute normalizes each target's column over the owners ``p``."""
        return self.logits(branch, y).softmax(dim=2 if branch is self.collect else 1)

    def delta(self, x: Tensor) -> Tensor:
        """The added term, shape ``(N, C, H, W)``."""
        size = x.shape[-2:]
        m = self.mask_size
        if size[0] > m or size[1] > m:
            x = F.adaptive_avg_pool2d(x, (min(size[0], m), min(size[1], m)))
        n, _, h, w = x.shape
        zs = []
        for branch in (self.collect, self.distribute):
            y = branch["reduce"](x)
            a = self.attention(branch, y)
            # collect: z_p = sum_q a[p, q] y_q (p reads); distribute: z_q = sum_p a[p, q] y_p (p spreads)
            zs.append(torch.bmm(y.flatten(2), a.transpose(1, 2) if branch is self.collect else a))
        out = self.proj(torch.cat(zs, dim=1).reshape(n, -1, h, w))
        if out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.delta(x)
