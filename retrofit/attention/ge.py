"""Gather-Excite.

Hu, Shen, Albanie, Sun, Vedaldi: "Gather-Excite: Exploiting Feature Context in Convolutional
Neural Networks", NeurIPS 2018, arXiv:1810.12348.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AttentionError
from ._act import get_act_layer
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._reduction import reduced_channels
from ._registry import register_attention

__all__ = ["GatherExcite"]


@register_attention("ge")
class GatherExcite(nn.Module):
    """Gather-Excite: gather context over a spatial extent, excite by a gate upsampled back
    (nearest neighbour) to the input's size.

    Three variants, with timm's ``GatherExcite`` argument names:

    * GE-θ⁻ (the default, ``extra_params=False, use_mlp=False``): the gather is average
      pooling (global for ``extent=0``, else a ``2*extent-1`` window with stride ``extent``),
      the gate ``sigma(alpha * gathered)``.
    * GE-θ (``extra_params=True``): the gather is depthwise convolutions, ``log2(extent)``
      3x3 stride-2 ones with an activation between them; for the global extent one depthwise
      convolution over the map average-pooled to ``feat_size`` x ``feat_size``.
    * GE-θ⁺ (``use_mlp=True``, with either gather): a 1x1 bottleneck (as in SE) after it.

    Where it differs from the paper: the parameter-free θ⁻ gets one learnable scale per
    channel, ``alpha`` (``C`` parameters), multiplying the gathered values before the gate:
    ``alpha = 1`` is the paper's gate exactly (the ``sigmoid`` form's init), ``alpha = 0``
    the identity. The parametric gathers have biases and no BatchNorm (the paper's running
    statistics would break identity in train mode). The global-extent θ gather works at any
    size because it sees the map pooled to ``feat_size`` (the paper's kernel is the map).
    ``scale(x)`` returns the gate, shape ``(N, C, 1, 1)`` for the global extent, else
    ``(N, C, H, W)``.

    Args:
        channels: input (and output) channels.
        extent: gather extent; 0 is global, else a power of two for ``extra_params``, any
            integer >= 2 otherwise.
        extra_params: parametric depthwise gather (GE-θ).
        use_mlp: a bottleneck after the gather (GE-θ⁺).
        feat_size: grid the global-extent parametric gather pools the map to.
        rd_ratio: bottleneck width as a fraction of ``channels`` (``use_mlp`` only).
        rd_channels: bottleneck width; overrides ``rd_ratio``.
        rd_divisor: round the bottleneck width to a multiple of this.
        act_layer: activation between gather convolutions and in the bottleneck.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: an extent the chosen gather cannot use.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        extent: int = 0,
        extra_params: bool = False,
        use_mlp: bool = False,
        feat_size: int = 7,
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
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        if extent != 0 and (extent < 2 or (extra_params and extent & (extent - 1))):
            need = "a power of two >= 2" if extra_params else "an integer >= 2"
            raise AttentionError(f"ge: extent = {extent} is not valid (0 for global, or {need})")
        if extent == 0 and extra_params and feat_size < 1:
            raise AttentionError(f"ge: feat_size = {feat_size} must be at least 1")
        self.extent = extent
        self.feat_size = feat_size
        act = get_act_layer("ge", act_layer)
        self.gather: nn.Sequential | None = None
        if extra_params:
            self.gather = nn.Sequential()
            if extent == 0:
                self.gather.add_module("conv1", nn.Conv2d(channels, channels, feat_size, groups=channels, **dd))
            else:
                n = int(math.log2(extent))
                for i in range(n):
                    conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels, **dd)
                    self.gather.add_module(f"conv{i + 1}", conv)
                    if i != n - 1:
                        self.gather.add_module(f"act{i + 1}", act())
        self.mlp: nn.Sequential | None = None
        if use_mlp:
            rd_channels = reduced_channels("ge", channels, rd_ratio, rd_channels, rd_divisor)
            self.mlp = nn.Sequential(
                nn.Conv2d(channels, rd_channels, 1, **dd), act(), nn.Conv2d(rd_channels, channels, 1, **dd)
            )
        self.alpha: nn.Parameter | None = None
        if self.gather is None and self.mlp is None:
            self.alpha = nn.Parameter(torch.empty(channels, 1, 1, **dd))
        self.reset_parameters()

    def _last(self) -> nn.Conv2d | None:
        layers = self.mlp if self.mlp is not None else self.gather
        # both end in a convolution: the mlp's second, or the gather's last (acts sit between)
        return None if layers is None else cast(nn.Conv2d, layers[-1])

    def reset_parameters(self) -> None:
        """PyTorch's default init, ``alpha = 1``; with the identity gate the last layer (or
        ``alpha``) starts at zero."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        if self.alpha is not None:
            if self.gate == "identity":
                zero_init_(self.alpha)
            else:
                nn.init.constant_(self.alpha, 1.0)
        last = self._last()
        if last is not None and self.gate == "identity":
            zero_init_(last)

    def _gather(self, x: Tensor) -> Tensor:
        if self.gather is None:
            if self.extent == 0:
                return x.mean((2, 3), keepdim=True)
            k = 2 * self.extent - 1
            return F.avg_pool2d(x, k, stride=self.extent, padding=k // 2, count_include_pad=False)
        if self.extent == 0:
            x = F.adaptive_avg_pool2d(x, self.feat_size)
        return self.gather(x)

    def scale(self, x: Tensor) -> Tensor:
        """The gate: ``(N, C, 1, 1)`` for the global extent, else ``(N, C, H, W)``."""
        z = self._gather(x)
        if self.mlp is not None:
            z = self.mlp(z)
        if self.alpha is not None:
            z = z * self.alpha
        if self.extent != 0:
            z = F.interpolate(z, size=x.shape[-2:], mode="nearest")
        return apply_gate(z, self.gate)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
