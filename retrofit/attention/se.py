"""Squeeze-and-Excitation.

Hu, Shen, Albanie, Sun, Wu: "Squeeze-and-Excitation Networks", CVPR 2018, arXiv:1709.01507.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._act import get_act_layer
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._reduction import reduced_channels
from ._registry import register_attention

__all__ = ["SqueezeExcite"]


@register_attention("se")
class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation: global average pool, a two-layer bottleneck, a channel gate.

    Arguments and defaults are timm's ``SEModule``: with ``gate="sigmoid"`` this module has
    exactly the parameters of timm's, so SE-ResNet weights load into it (``fc1``/``fc2``
    are biased 1x1 convolutions). Where it differs: no optional BatchNorm between the two
    layers (its running statistics would break identity in train mode), and the gate form.

    Args:
        channels: input (and output) channels.
        rd_ratio: bottleneck width as a fraction of ``channels``.
        rd_channels: bottleneck width; overrides ``rd_ratio``.
        rd_divisor: round the bottleneck width to a multiple of this.
        bias: biases in the two 1x1 convolutions.
        act_layer: activation between the two layers (class or timm name).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        bias: bool = True,
        act_layer: type[nn.Module] | str = nn.ReLU,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        rd_channels = reduced_channels("se", channels, rd_ratio, rd_channels, rd_divisor)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        self.act = get_act_layer("se", act_layer)(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate the last layer starts at zero."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.fc2)

    def scale(self, x: Tensor) -> Tensor:
        """The per-channel gate, shape ``(N, C, 1, 1)``; ``forward`` multiplies it in."""
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(self.act(self.fc1(s)))
        return apply_gate(s, self.gate)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
