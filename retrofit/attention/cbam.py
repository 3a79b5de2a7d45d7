"""Convolutional Block Attention Module.

Woo, Park, Lee, Kweon: "CBAM: Convolutional Block Attention Module", ECCV 2018,
arXiv:1807.06521.

Also timm's light variant, which is not in the paper: ``lcbam`` (each gate pools once).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._act import get_act_layer
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._reduction import reduced_channels
from ._registry import register_attention

__all__ = ["Cbam", "LightCbam"]


def _odd(k: object) -> bool:
    return isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1


@register_attention("cbam")
class Cbam(nn.Module):
    """CBAM: a channel gate from a shared MLP on average- and max-pooled features, then a
    spatial gate from a 7x7 convolution on the channel-wise mean and max.

    Arguments and defaults are timm's ``CbamModule`` (``rd_divisor=1``, no MLP biases).
    Where it differs: the spatial convolution has a bias and no BatchNorm after it (timm
    uses conv + BatchNorm; running statistics would break identity in train mode), so the
    spatial gate has ``2 * k * k + 1`` parameters instead of ``2 * k * k + 2``.

    Args:
        channels: input (and output) channels.
        rd_ratio: MLP hidden width as a fraction of ``channels``.
        rd_channels: MLP hidden width; overrides ``rd_ratio``.
        rd_divisor: round the hidden width to a multiple of this.
        spatial_kernel_size: kernel of the spatial convolution (odd).
        act_layer: activation inside the MLP (class or timm name).
        mlp_bias: biases in the MLP's two 1x1 convolutions.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    # forward is x * channel_scale(x), then that times spatial_scale(...): the rewrite may fuse
    # the last product into a residual add
    fused_gates = ("channel_scale", "spatial_scale")

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        spatial_kernel_size: int = 7,
        act_layer: type[nn.Module] | str = nn.ReLU,
        mlp_bias: bool = False,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        if not _odd(spatial_kernel_size):
            raise AttentionError(f"cbam: spatial_kernel_size = {spatial_kernel_size!r} is not valid: an odd integer "
                                 ">= 1, so the spatial gate keeps the map's size")
        rd_channels = reduced_channels("cbam", channels, rd_ratio, rd_channels, rd_divisor)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, **dd)
        self.act = get_act_layer("cbam", act_layer)(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, **dd)
        self.spatial = nn.Conv2d(2, 1, spatial_kernel_size, padding=spatial_kernel_size // 2, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate both last layers start at zero."""
        for conv in (self.fc1, self.fc2, self.spatial):
            conv.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.fc2, self.spatial)

    def channel_scale(self, x: Tensor) -> Tensor:
        """The channel gate, shape ``(N, C, 1, 1)``."""
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return apply_gate(avg + mx, self.gate)

    def spatial_scale(self, x: Tensor) -> Tensor:
        """The spatial gate, shape ``(N, 1, H, W)``."""
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return apply_gate(self.spatial(s), self.gate)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.channel_scale(x)
        return x * self.spatial_scale(x)


@register_attention("lcbam")
class LightCbam(nn.Module):
    """Light CBAM (timm's ``lcbam``): CBAM whose two gates each pool once, by the mean of
    average and max pooling, ``0.5 * avg + 0.5 * max`` (one MLP pass for the channel gate,
    a one-map 7x7 convolution with BatchNorm for the spatial gate).

    Not in the paper: timm's ``LightCbamModule``, whose arguments, defaults and state-dict
    keys this module has (``channel.fc1``, ``channel.fc2``; ``spatial.conv.conv`` and its
    BatchNorm ``spatial.conv.bn``), so its weights load into it; ``gate="sigmoid"`` is
    timm's module exactly. The identity form puts both gates under ``2 * sigmoid`` and
    starts ``channel.fc2`` and the BatchNorm's weight and bias at zero: the BatchNorm then
    outputs exactly 0 whatever its statistics (batch or running), so both gates are exactly
    1.0 in train and eval mode. ``fc2`` and the BatchNorm learn from the first step,
    ``fc1`` and the spatial convolution from the second. Where it differs: the gate form.
    The BatchNorm needs more than one value per map in train mode (a 1x1 map at batch 1
    fails, as the host model's own BatchNorm at that size does).

    Args:
        channels: input (and output) channels.
        rd_ratio: MLP hidden width as a fraction of ``channels``.
        rd_channels: MLP hidden width; overrides ``rd_ratio``.
        rd_divisor: round the hidden width to a multiple of this.
        spatial_kernel_size: kernel of the spatial convolution (odd).
        act_layer: activation inside the MLP (class or timm name).
        mlp_bias: biases in the MLP's two 1x1 convolutions.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (timm's module).
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    # forward is x * channel_scale(x), then that times spatial_scale(...): the rewrite may fuse
    # the last product into a residual add
    fused_gates = ("channel_scale", "spatial_scale")

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        spatial_kernel_size: int = 7,
        act_layer: type[nn.Module] | str = nn.ReLU,
        mlp_bias: bool = False,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        if not _odd(spatial_kernel_size):
            raise AttentionError(f"lcbam: spatial_kernel_size = {spatial_kernel_size!r} is not valid: an odd "
                                 "integer >= 1, so the spatial gate keeps the map's size")
        rd_channels = reduced_channels("lcbam", channels, rd_ratio, rd_channels, rd_divisor)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        # ModuleDicts named as timm's submodules, so the state-dict keys are timm's
        self.channel = nn.ModuleDict({
            "fc1": nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, **dd),
            "act": get_act_layer("lcbam", act_layer)(inplace=True),
            "fc2": nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, **dd),
        })
        conv = nn.Conv2d(1, 1, spatial_kernel_size, padding=spatial_kernel_size // 2, bias=False, **dd)
        self.spatial = nn.ModuleDict({"conv": nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(1, **dd)))})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init (fresh BatchNorm statistics); with the identity gate
        ``channel.fc2`` and the spatial BatchNorm's weight and bias start at zero."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
                m.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.channel["fc2"], cast(nn.BatchNorm2d, self.spatial["conv"].bn))

    def channel_scale(self, x: Tensor) -> Tensor:
        """The channel gate, shape ``(N, C, 1, 1)``."""
        pooled = 0.5 * x.mean((2, 3), keepdim=True) + 0.5 * x.amax((2, 3), keepdim=True)
        z = self.channel["fc2"](self.channel["act"](self.channel["fc1"](pooled)))
        return apply_gate(z, self.gate)

    def spatial_scale(self, x: Tensor) -> Tensor:
        """The spatial gate, shape ``(N, 1, H, W)``."""
        pooled = 0.5 * x.mean(1, keepdim=True) + 0.5 * x.amax(1, keepdim=True)
        return apply_gate(self.spatial["conv"](pooled), self.gate)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.channel_scale(x)
        return x * self.spatial_scale(x)
