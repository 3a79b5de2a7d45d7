"""Concurrent spatial and channel squeeze-and-excitation.

Roy, Navab, Wachinger: "Concurrent Spatial and Channel Squeeze & Excitation in Fully
Convolutional Networks", MICCAI 2018, arXiv:1803.02579; as segmentation_models_pytorch's
``SCSEModule`` (``decoder_attention_type="scse"``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._act import get_act_layer
from ._constraints import bottleneck_problem, width_problem
from ._factory import FactoryKwargs
from ._gate import check_gate, zero_init_
from ._reduction import bottleneck_width, check_reduction_args
from ._registry import register_attention

__all__ = ["ConcurrentSqueezeExcite"]


@register_attention("scse")
class ConcurrentSqueezeExcite(nn.Module):
    """scSE: a channel gate (SE) and a spatial gate (a 1x1 convolution to one map) side by
    side, summed: x * sigma(c) + x * sigma(s).

    The layers and state-dict keys of segmentation_models_pytorch's ``SCSEModule``
    (``cSE.1``, ``cSE.3``, ``sSE.0``; its weights load, and with them its output), with
    timm's argument names (``rd_ratio = 1/16`` is its ``reduction=16``, the width
    ``C // 16`` as it floors it; a site with fewer channels has no bottleneck and is
    skipped, ``site_problem``). Where it differs: nothing in the mechanism. The two gates
    are summed, and ``sigma(0) + sigma(0) = 0.5 + 0.5`` is exactly 1.0, so the identity form
    is the paper's own function with the channel branch's last convolution and the spatial
    convolution at zero (``gate="sigmoid"``: PyTorch's default init, smp's); both learn from
    the first step, the channel branch's first convolution from the second. The forward
    multiplies once, ``x * (sigma(c) + sigma(s))``, where smp multiplies twice and adds
    (the same up to one rounding). ``scale(x)`` returns the summed gate, ``(N, C, H, W)``.

    Args:
        channels: input (and output) channels.
        rd_ratio: bottleneck width as a fraction of ``channels`` (smp's 1 / reduction).
        rd_channels: bottleneck width; overrides ``rd_ratio``.
        rd_divisor: round the width from ``rd_ratio`` down to a multiple of this.
        act_layer: activation in the channel branch (class or timm name).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper's init).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: a bottleneck of no channel.
    """

    constraints = "channels * rd_ratio >= 1 (16 channels at the default 1/16), unless rd_channels is given"
    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    @classmethod
    def site_problem(cls, channels: int, size: tuple[int, int], rd_ratio: float = 1.0 / 16,
                     rd_channels: int | None = None, rd_divisor: int = 1, **_: object) -> str | None:
        """Why a site of ``channels`` cannot take scSE (its bottleneck would be empty), or None."""
        return bottleneck_problem("scse", channels, rd_ratio, rd_channels, rd_divisor)

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        act_layer: type[nn.Module] | str = nn.ReLU,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        check_reduction_args("scse", {"rd_ratio": rd_ratio, "rd_channels": rd_channels, "rd_divisor": rd_divisor})
        width, how = bottleneck_width(channels, rd_ratio, rd_channels, rd_divisor)
        why = width_problem(channels, width, how)
        if why is not None:
            raise AttentionError(f"scse: {why}")
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        # smp's layout, index for index, so that its state dict loads: pool, conv, act, conv
        self.cSE = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, width, 1, **dd),
            get_act_layer("scse", act_layer)(inplace=True),
            nn.Conv2d(width, channels, 1, **dd),
        )
        self.sSE = nn.Sequential(nn.Conv2d(channels, 1, 1, **dd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate the channel branch's last
        convolution and the spatial convolution start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.cSE[3], self.sSE[0])

    def scale(self, x: Tensor) -> Tensor:
        """The summed gate ``sigma(c) + sigma(s)``, shape ``(N, C, H, W)``."""
        return torch.sigmoid(self.cSE(x)) + torch.sigmoid(self.sSE(x))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
