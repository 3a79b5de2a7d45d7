"""Global Attention Mechanism.

Liu, Shao, Hoffmann: "Global Attention Mechanism: Retain Information to Enhance
Channel-Spatial Interactions", arXiv:2112.05561. The authors published no code; this module
follows the paper's equations (its figures 2 and 3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._act import get_act_layer
from ._constraints import check_positive_int, is_positive_int, width_problem
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._reduction import bottleneck_width, check_reduction_args
from ._registry import register_attention

__all__ = ["GlobalAttnMechanism"]


def _problem(channels: int, rd_ratio: float, rd_channels: int | None, rd_divisor: int, groups: object) -> str | None:
    """Why ``channels`` cannot take GAM with these arguments (an empty bottleneck, groups that
    do not divide the channels or the bottleneck), or None; None too for arguments the
    constructor rejects."""
    try:
        check_reduction_args("gam", {"rd_ratio": rd_ratio, "rd_channels": rd_channels, "rd_divisor": rd_divisor})
    except AttentionError:
        return None
    width, how = bottleneck_width(channels, rd_ratio, rd_channels, rd_divisor)
    why = width_problem(channels, width, how)
    if why is not None or not is_positive_int(groups) or groups == 1:
        return why
    if channels % groups or width % groups:
        return (f"groups = {groups} must divide the {channels} channels and the bottleneck's {how} = {width} "
                "(the grouped spatial convolutions)")
    return None


@register_attention("gam")
class GlobalAttnMechanism(nn.Module):
    """GAM: a channel gate from an MLP at every position (no pooling), then a spatial gate
    from two 7x7 convolutions through a bottleneck, chained as in CBAM.

    The channel MLP runs along C at each position (the paper's 3-D permutation): ``x = x *
    M_c(x)``, then ``x * M_s(x)``.

    Arguments follow timm's attention modules; ``rd_ratio = 1/4`` is the paper's reduction
    rate r = 4, and the bottleneck width is ``floor(C * rd_ratio)`` as in the implementations
    the paper's users run (``int(C / rate)``), so a site with fewer than ``1 / rd_ratio``
    channels is skipped (``site_problem``). Where it differs from the paper: no BatchNorm
    after the two spatial convolutions (their running statistics would break identity in
    train mode; in eval mode a BatchNorm is an affine map the convolution's weight and bias
    absorb, which is how the oracle test compares the two), and the gate form: with
    ``gate="identity"`` the MLP's and the spatial branch's last layers start at zero and each
    gate is ``2 * sigma(0) = 1.0`` (a shuffled gate of ones is ones); the first layers
    learn from the second step. ``groups > 1`` is the paper's ResNet-50 variant, which it
    describes only as grouped convolutions with channel shuffle: both spatial convolutions
    grouped, and the spatial gate channel-shuffled by ``groups`` before it multiplies, as
    the implementations YOLO users run do it (``group=True``, groups = rate = 4); it divides
    the spatial branch's parameters by ``groups`` (ungrouped, GAM adds about 500 million
    parameters to a ResNet-50). ``channel_scale(x)`` and ``spatial_scale(x)`` return the two
    gates, both ``(N, C, H, W)``.

    Args:
        channels: input (and output) channels.
        rd_ratio: bottleneck width as a fraction of ``channels`` (1 / r).
        rd_channels: bottleneck width; overrides ``rd_ratio``.
        rd_divisor: round the width from ``rd_ratio`` down to a multiple of this.
        kernel_size: kernel of the two spatial convolutions (odd; the paper's 7).
        groups: groups of the two spatial convolutions, and of the gate's channel shuffle
            (1: none, the paper's equations; 4: its ResNet-50 variant).
        act_layer: activation inside the MLP and between the convolutions (class or timm name).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: a bottleneck of no channel, ``groups`` that do not divide the channels
            and the bottleneck, or an even ``kernel_size``.
    """

    constraints = ("channels * rd_ratio >= 1 (4 channels at the default 1/4) unless rd_channels is given; "
                   "groups divide the channels and that bottleneck")
    # forward is x * channel_scale(x), then that times spatial_scale(...): the rewrite may fuse
    # the last product into a residual add
    fused_gates = ("channel_scale", "spatial_scale")

    @classmethod
    def site_problem(cls, channels: int, size: tuple[int, int], rd_ratio: float = 0.25,
                     rd_channels: int | None = None, rd_divisor: int = 1, groups: int = 1,
                     **_: object) -> str | None:
        """Why a site of ``channels`` cannot take GAM (an empty bottleneck, groups that do
        not divide), or None."""
        return _problem(channels, rd_ratio, rd_channels, rd_divisor, groups)

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 0.25,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        kernel_size: int = 7,
        groups: int = 1,
        act_layer: type[nn.Module] | str = nn.ReLU,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        check_reduction_args("gam", {"rd_ratio": rd_ratio, "rd_channels": rd_channels, "rd_divisor": rd_divisor})
        if check_positive_int("gam", "kernel_size", kernel_size) % 2 == 0:
            raise AttentionError(f"gam: kernel_size = {kernel_size} is not valid: an odd integer >= 1, so the "
                                 "spatial gate keeps the map's size")
        self.groups = check_positive_int("gam", "groups", groups)
        why = _problem(channels, rd_ratio, rd_channels, rd_divisor, groups)
        if why is not None:
            raise AttentionError(f"gam: {why}")
        width = bottleneck_width(channels, rd_ratio, rd_channels, rd_divisor)[0]
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(channels, width, **dd)
        self.act = get_act_layer("gam", act_layer)(inplace=True)
        self.fc2 = nn.Linear(width, channels, **dd)
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(channels, width, kernel_size, padding=pad, groups=groups, **dd)
        self.conv2 = nn.Conv2d(width, channels, kernel_size, padding=pad, groups=groups, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate both last layers start at zero."""
        for layer in (self.fc1, self.fc2, self.conv1, self.conv2):
            layer.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.fc2, self.conv2)

    def channel_scale(self, x: Tensor) -> Tensor:
        """The channel gate at every position, shape ``(N, C, H, W)``."""
        z = self.fc2(self.act(self.fc1(x.permute(0, 2, 3, 1))))  # the MLP along C, at each (H, W)
        return apply_gate(z.permute(0, 3, 1, 2), self.gate)

    def spatial_scale(self, x: Tensor) -> Tensor:
        """The spatial gate, shape ``(N, C, H, W)`` (channel-shuffled with ``groups > 1``)."""
        g = apply_gate(self.conv2(self.act(self.conv1(x))), self.gate)
        if self.groups == 1:
            return g
        b, c, h, w = g.shape
        # channel i of group k goes to i * groups + k, so that each output mixes every group
        return g.reshape(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.channel_scale(x)
        return x * self.spatial_scale(x)
