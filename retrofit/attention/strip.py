"""Strip attention, as timm builds it: a minimal form of strip pooling.

timm's ``StripAttn`` has no paper of its own; its strip pooling is that of Hou, Zhang,
Cheng, Feng: "Strip Pooling: Rethinking Spatial Pooling for Scene Parsing", CVPR 2020,
arXiv:2003.13328.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._registry import register_attention

__all__ = ["StripAttn"]


@register_attention("strip")
class StripAttn(nn.Module):
    """Strip attention: average-pool along W and along H, a depthwise 1-D convolution along
    each strip, and one gate of their sum broadcast over the map, ``x * gate(s_h + s_w)``.

    Arguments, defaults and state-dict keys are timm's ``StripAttn`` (``conv_h``,
    ``conv_w``: depthwise ``k x 1`` and ``1 x k`` convolutions without bias), so its weights
    load into it; ``gate="sigmoid"`` is timm's module exactly. Against the strip pooling
    module of Hou et al. it keeps the two pooled strips and their 1-D convolutions (made
    depthwise) and drops the 1x1 convolution that fuses them before the gate.

    The identity form starts both convolutions (and their biases) at zero under a
    ``2 * sigmoid`` gate, so the gate is exactly 1.0 at init and they learn from the first
    step. Where it differs from timm: ``use_conv=False`` (timm's parameter-free form, the
    gate of the pooled strips alone) has nothing to start at identity and takes only
    ``gate="sigmoid"``; no ``has_skip`` (timm's option to add the input back, off by
    default: it would double the input at identity); and the gate form.

    Args:
        channels: input (and output) channels.
        use_conv: the depthwise strip convolutions (``False``: none, no parameters).
        kernel_size: odd kernel of the strip convolutions.
        bias: biases in the strip convolutions.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (timm's module).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: an even kernel, or ``use_conv=False`` in the identity form.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        use_conv: bool = True,
        kernel_size: int = 3,
        bias: bool = False,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        if not use_conv and self.gate == "identity":
            raise AttentionError("strip: use_conv=False has no parameters, so nothing can start its gate at 1.0; "
                                 "use use_conv=True for the identity form, or gate='sigmoid'")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise AttentionError(f"strip: kernel_size = {kernel_size!r} is not valid: an odd integer >= 1, so the "
                                 "gate keeps the map's size")
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        pad = kernel_size // 2
        self.conv_h: nn.Module = nn.Identity()
        self.conv_w: nn.Module = nn.Identity()
        if use_conv:
            self.conv_h = nn.Conv2d(channels, channels, (kernel_size, 1), padding=(pad, 0), groups=channels,
                                    bias=bias, **dd)
            self.conv_w = nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, pad), groups=channels,
                                    bias=bias, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate both convolutions start at zero."""
        for conv in (self.conv_h, self.conv_w):
            if isinstance(conv, nn.Conv2d):
                conv.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.conv_h, self.conv_w)

    def scale(self, x: Tensor) -> Tensor:
        """The gate, shape ``(N, C, H, W)``."""
        s_h = self.conv_h(x.mean(3, keepdim=True))  # (N, C, H, 1)
        s_w = self.conv_w(x.mean(2, keepdim=True))  # (N, C, 1, W)
        return apply_gate(s_h + s_w, self.gate)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
