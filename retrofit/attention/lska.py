"""Large Separable Kernel Attention.

Lau, Po, Rehman: "Large Separable Kernel Attention: Rethinking the Large Kernel Attention
Design in CNN", Expert Systems with Applications, 2024, arXiv:2309.01439; official code
github.com/StevenLauHKHK/Large-Separable-Kernel-Attention (``models/van.py``, ``LSKA``).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._factory import FactoryKwargs
from ._gate import check_gate, zero_init_
from ._registry import register_attention

__all__ = ["LargeSeparableKernelAttn", "LSKA_KERNELS"]

# The official decompositions of a k x k depthwise kernel: (local kernel, dilated kernel,
# dilation): a 1 x k0 and k0 x 1 pair, then a 1 x k1 and k1 x 1 pair of dilation d.
LSKA_KERNELS: dict[int, tuple[int, int, int]] = {
    7: (3, 3, 2), 11: (3, 5, 2), 23: (5, 7, 3), 35: (5, 11, 3), 41: (5, 13, 3), 53: (5, 17, 3),
}


@register_attention("lska")
class LargeSeparableKernelAttn(nn.Module):
    """LSKA: a large depthwise kernel as four separable convolutions, then a 1x1, give an
    attention map that multiplies the input, unsquashed: x * attn(x).

    The separable convolutions are 1 x k0 and k0 x 1, then 1 x k1 and k1 x 1 dilated; large
    kernel attention has no sigmoid.

    Follows the official ``LSKA`` class: the same layers, state-dict keys (``conv0h``,
    ``conv0v``, ``conv_spatial_h``, ``conv_spatial_v``, ``conv1``; its weights load) and
    output, for the official kernel sizes 7, 11, 23, 35, 41 and 53 (its ``k_size``; here
    ``kernel_size``, timm's name). The paper's gate is the map itself, so the identity form
    is only an init: ``conv1``'s weight at zero and its bias at one make the map exactly
    1.0 (``gate="sigmoid"`` selects the paper's form with PyTorch's default init, which the
    official class uses when it stands alone; VAN re-initialises it). ``conv1`` learns from
    the first step, the depthwise convolutions from the second. Where it differs: nothing.
    ``scale(x)`` returns the map, shape ``(N, C, H, W)``.

    Args:
        channels: input (and output) channels.
        kernel_size: the large kernel the decomposition stands for: 7, 11, 23, 35, 41 or 53.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper's form).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: a kernel size the official code does not decompose.
    """

    # No site property limits LSKA (its convolutions are padded to any map); its one rule is
    # on an argument, which the plan checks with the rule that gave it, before any rewrite.
    constraints = "kernel_size is 7, 11, 23, 35, 41 or 53, the official decompositions (another is an error)"
    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        if isinstance(kernel_size, bool) or kernel_size not in LSKA_KERNELS:
            raise AttentionError(f"lska: kernel_size = {kernel_size!r} is not valid: one of "
                                 f"{', '.join(map(str, LSKA_KERNELS))} (the official decompositions)")
        k0, k1, d = LSKA_KERNELS[kernel_size]
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        c = channels
        self.conv0h = nn.Conv2d(c, c, (1, k0), padding=(0, k0 // 2), groups=c, **dd)
        self.conv0v = nn.Conv2d(c, c, (k0, 1), padding=(k0 // 2, 0), groups=c, **dd)
        pad = (k1 - 1) * d // 2
        self.conv_spatial_h = nn.Conv2d(c, c, (1, k1), padding=(0, pad), groups=c, dilation=d, **dd)
        self.conv_spatial_v = nn.Conv2d(c, c, (k1, 1), padding=(pad, 0), groups=c, dilation=d, **dd)
        self.conv1 = nn.Conv2d(c, c, 1, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate ``conv1`` starts at weight 0, bias 1."""
        for conv in (self.conv0h, self.conv0v, self.conv_spatial_h, self.conv_spatial_v, self.conv1):
            conv.reset_parameters()
        if self.gate == "identity":
            zero_init_(cast(nn.Parameter, self.conv1.weight))
            if self.conv1.bias is not None:  # always: conv1 is built with a bias
                nn.init.ones_(self.conv1.bias)

    def scale(self, x: Tensor) -> Tensor:
        """The attention map, shape ``(N, C, H, W)``."""
        a = self.conv_spatial_v(self.conv_spatial_h(self.conv0v(self.conv0h(x))))
        return self.conv1(a)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
