"""Polarized Self-Attention.

Liu, Xu, Lin, Yuan, Zhang: "Polarized Self-Attention: Towards High-quality Pixel-wise
Regression", arXiv:2107.00782; official code github.com/DeLightCMU/PSA
(``semantic-segmentation/network/PSA.py``: ``PSA_p`` parallel, ``PSA_s`` sequential).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._factory import FactoryKwargs
from ._gate import check_gate, zero_init_
from ._registry import register_attention

__all__ = ["PolarizedSelfAttn"]

_LAYOUTS = ("parallel", "sequential")


def _problem(channels: int, layout: object) -> str | None:
    """Why ``channels`` are too few for the layout's branches, or None."""
    need = {"parallel": 2, "sequential": 8}.get(layout) if isinstance(layout, str) else None
    if need is None or channels >= need:
        return None
    return (f"{channels} channels are too few for the {layout} layout: its branches are C // 2 wide"
            + (" and its channel bottleneck C // 8" if layout == "sequential" else "") + f", at least {need} channels")


@register_attention("polarized")
class PolarizedSelfAttn(nn.Module):
    """Polarized self-attention: a channel-only and a spatial-only self-attention gate, in
    parallel (summed) or in sequence.

    The channel-only branch: values at C/2, a single-channel query softmaxed over the
    positions, their product projected back to C (one gate per channel). The spatial-only
    branch: the globally pooled C/2 query against C/2 values at every position (one gate
    per position). Both end in a sigmoid; ``layout="parallel"`` sums the two gated tensors,
    ``layout="sequential"`` gates the channel-gated tensor spatially.

    Follows the official code, not the paper, where the two disagree (as the official code
    is what was trained): parallel (``PSA_p``) projects the channel branch with one 1x1
    convolution without LayerNorm and softmaxes the spatial branch's product over the
    positions; sequential (``PSA_s``) projects through a C/2 -> C/8 -> C bottleneck with
    LayerNorm and ReLU and softmaxes the spatial values over the positions before the
    product (the paper: one projection with LayerNorm, and a softmax over the pooled
    query's channels, in both layouts). The layers, their state-dict keys (official
    weights load) and their init (Kaiming fan-in for the four query and value convolutions)
    are the official ones.

    Where it differs: the identity form. The spatial gate is the sigmoid of a softmax, which
    no weight can set to a constant (its values sum to one), so both forms compute the
    official gate ``G(x)`` (parallel: ``sigma(ch) + sigma(sp)``; sequential: ``sigma(ch) *
    sigma(sp)`` of the channel-gated tensor) and blend it with a learnable weight per
    channel, ``x * (1 + alpha * (G(x) - 1))``: ``alpha = 0`` is the identity (the
    ``identity`` form's init), ``alpha = 1`` the official output up to one rounding (the
    ``sigmoid`` form's). That adds ``C`` parameters; ``alpha`` learns from the first step,
    the rest from the second. A site with too few channels for the branches is skipped
    (``site_problem``). ``scale(x)`` returns the blended gate, shape ``(N, C, H, W)``.

    Args:
        channels: input (and output) channels.
        layout: ``"parallel"`` or ``"sequential"``.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the official code).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: an unknown layout, or too few channels for it.
    """

    constraints = "at least 2 channels (8 for layout='sequential'): the branches are C // 2 wide"
    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    @classmethod
    def site_problem(cls, channels: int, size: tuple[int, int], layout: str = "parallel",
                     **_: object) -> str | None:
        """Why a site of ``channels`` cannot take polarized self-attention, or None."""
        return _problem(channels, layout)

    def __init__(
        self,
        channels: int,
        layout: str = "parallel",
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        if layout not in _LAYOUTS:
            raise AttentionError(f"polarized: layout = {layout!r} is not valid: 'parallel' or 'sequential'")
        why = _problem(channels, layout)
        if why is not None:
            raise AttentionError(f"polarized: {why}")
        self.layout = layout
        inter = channels // 2
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.conv_q_right = nn.Conv2d(channels, 1, 1, bias=False, **dd)
        self.conv_v_right = nn.Conv2d(channels, inter, 1, bias=False, **dd)
        self.conv_up: nn.Module
        if layout == "parallel":
            self.conv_up = nn.Conv2d(inter, channels, 1, bias=False, **dd)
        else:
            self.conv_up = nn.Sequential(
                nn.Conv2d(inter, inter // 4, 1, **dd),
                nn.LayerNorm([inter // 4, 1, 1], **dd),
                nn.ReLU(inplace=True),
                nn.Conv2d(inter // 4, channels, 1, **dd),
            )
        self.conv_q_left = nn.Conv2d(channels, inter, 1, bias=False, **dd)
        self.conv_v_left = nn.Conv2d(channels, inter, 1, bias=False, **dd)
        self.alpha = nn.Parameter(torch.empty(channels, 1, 1, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init (Kaiming fan-in for the query and value convolutions, PyTorch's
        default for the projection); ``alpha = 0`` with the identity gate, 1 with the sigmoid one."""
        for conv in (self.conv_q_right, self.conv_v_right, self.conv_q_left, self.conv_v_left):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
        for m in self.conv_up.modules():
            if isinstance(m, (nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.alpha)
        else:
            nn.init.ones_(self.alpha)

    def channel_gate(self, x: Tensor) -> Tensor:
        """The channel-only branch's gate, shape ``(N, C, 1, 1)``."""
        v = self.conv_v_right(x).flatten(2)  # (N, C/2, HW)
        q = self.conv_q_right(x).flatten(2).softmax(dim=2)  # (N, 1, HW)
        context = torch.matmul(v, q.transpose(1, 2)).unsqueeze(-1)  # (N, C/2, 1, 1)
        return torch.sigmoid(self.conv_up(context))

    def spatial_gate(self, x: Tensor) -> Tensor:
        """The spatial-only branch's gate, shape ``(N, 1, H, W)``."""
        n, _, h, w = x.shape
        q = self.conv_q_left(x).mean((2, 3)).unsqueeze(1)  # (N, 1, C/2)
        v = self.conv_v_left(x).flatten(2)  # (N, C/2, HW)
        if self.layout == "parallel":
            context = torch.matmul(q, v).softmax(dim=2)
        else:
            context = torch.matmul(q, v.softmax(dim=2))
        return torch.sigmoid(context.reshape(n, 1, h, w))

    def official_gate(self, x: Tensor) -> Tensor:
        """``G(x)``, the official module's output over ``x``, shape ``(N, C, H, W)``."""
        ch = self.channel_gate(x)
        if self.layout == "parallel":
            return ch + self.spatial_gate(x)
        return ch * self.spatial_gate(x * ch)

    def scale(self, x: Tensor) -> Tensor:
        """The blended gate ``1 + alpha * (G(x) - 1)``, shape ``(N, C, H, W)``."""
        return 1.0 + self.alpha * (self.official_gate(x) - 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
