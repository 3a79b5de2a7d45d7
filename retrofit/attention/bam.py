"""Bottleneck Attention Module.

Park, Woo, Lee, Kweon: "BAM: Bottleneck Attention Module", BMVC 2018, arXiv:1807.06514;
official code github.com/Jongchan/attention-module (``MODELS/bam.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._act import get_act_layer
from ._constraints import bottleneck_problem, check_positive_int, width_problem
from ._factory import FactoryKwargs
from ._gate import check_gate, zero_init_
from ._reduction import bottleneck_width, check_reduction_args
from ._registry import register_attention

__all__ = ["Bam"]


@register_attention("bam")
class Bam(nn.Module):
    """BAM: a channel attention (pool, bottleneck MLP) and a spatial attention (dilated
    convolutions) in parallel; their product z gives the residual gate x * (1 + sigma(z)).

    The spatial attention is a 1x1 reduction, two dilated 3x3 convolutions and a 1x1 to one
    map; the channel map and the spatial map are broadcast to ``(C, H, W)`` and multiplied.

    Follows the official code (reduction 16 with its floor, ``C // 16``; two 3x3
    convolutions of dilation 4; a linear MLP with one hidden layer). Where it differs: no
    BatchNorm after the MLP's hidden layer and the spatial convolutions (running statistics
    would break identity in train mode; in eval mode a BatchNorm is an affine map the layer
    before absorbs, which is how the oracle test compares the two); the channel branch
    takes the global mean (the official code pools with an H x H window, the same on the
    square maps it was written for and no global pool on others); and the gate form. The
    paper's gate ``1 + sigma(z)`` lies in (1, 2) and is 1.5 at ``z = 0``, so no init makes it
    an identity; ``gate="identity"`` uses ``2 * sigma(z)`` (in (0, 2)) with the MLP's last
    layer at zero: then ``z = 0 * spatial = 0`` and the gate is exactly 1.0. The MLP's last
    layer learns from the first step (its gradient carries the spatial map), everything else
    from the second. A site with fewer than ``1 / rd_ratio`` channels has no bottleneck and
    is skipped (``site_problem``). ``scale(x)`` returns the gate, shape ``(N, C, H, W)``.

    Args:
        channels: input (and output) channels.
        rd_ratio: bottleneck width as a fraction of ``channels`` (the official 1/16).
        rd_channels: bottleneck width; overrides ``rd_ratio``.
        rd_divisor: round the width from ``rd_ratio`` down to a multiple of this.
        dilation_conv_num: number of dilated 3x3 convolutions in the spatial branch.
        dilation_val: their dilation (and padding).
        act_layer: activation after the hidden layers (class or timm name).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper's
            ``1 + sigma(z)``).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: a bottleneck of no channel, or a non-positive dilation setting.
    """

    constraints = "channels * rd_ratio >= 1 (16 channels at the default 1/16), unless rd_channels is given"
    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    @classmethod
    def site_problem(cls, channels: int, size: tuple[int, int], rd_ratio: float = 1.0 / 16,
                     rd_channels: int | None = None, rd_divisor: int = 1, **_: object) -> str | None:
        """Why a site of ``channels`` cannot take BAM (its bottleneck would be empty), or None."""
        return bottleneck_problem("bam", channels, rd_ratio, rd_channels, rd_divisor)

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        dilation_conv_num: int = 2,
        dilation_val: int = 4,
        act_layer: type[nn.Module] | str = nn.ReLU,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        check_reduction_args("bam", {"rd_ratio": rd_ratio, "rd_channels": rd_channels, "rd_divisor": rd_divisor})
        check_positive_int("bam", "dilation_val", dilation_val)
        if isinstance(dilation_conv_num, bool) or not isinstance(dilation_conv_num, int) or dilation_conv_num < 0:
            raise AttentionError(f"bam: dilation_conv_num = {dilation_conv_num!r} is not valid: an integer >= 0")
        width, how = bottleneck_width(channels, rd_ratio, rd_channels, rd_divisor)
        why = width_problem(channels, width, how)
        if why is not None:
            raise AttentionError(f"bam: {why}")
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        act = get_act_layer("bam", act_layer)
        self.fc1 = nn.Linear(channels, width, **dd)
        self.act = act(inplace=True)
        self.fc2 = nn.Linear(width, channels, **dd)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 1, **dd), act(inplace=True)]
        for _ in range(dilation_conv_num):
            layers += [nn.Conv2d(width, width, 3, padding=dilation_val, dilation=dilation_val, **dd), act(inplace=True)]
        layers.append(nn.Conv2d(width, 1, 1, **dd))
        self.spatial = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init (the official code's); with the identity gate the MLP's last
        layer starts at zero."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        for m in self.spatial:
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.fc2)

    def scale(self, x: Tensor) -> Tensor:
        """The gate, shape ``(N, C, H, W)``: ``1 + sigma(z)`` (paper) or ``2 * sigma(z)``."""
        channel = self.fc2(self.act(self.fc1(x.mean((2, 3)))))[:, :, None, None]  # (N, C, 1, 1)
        z = channel * self.spatial(x)  # (N, C, H, W): the official code's expand_as, then product
        if self.gate == "identity":
            return torch.sigmoid(z) * 2.0
        return 1.0 + torch.sigmoid(z)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
