"""Efficient Channel Attention.

Wang, Wu, Zhu, Li, Zuo, Hu: "ECA-Net: Efficient Channel Attention for Deep Convolutional
Neural Networks", CVPR 2020, arXiv:1910.03151.

Also timm's two variants of it, which are not in the paper: ``ecam`` (a channel MLP) and
``ceca`` (circular padding across channels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AttentionError
from ._act import get_act_layer
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._reduction import check_reduction_args, make_divisible
from ._registry import register_attention

__all__ = ["EfficientChannelAttn", "EfficientChannelAttnMlp", "CircularEfficientChannelAttn", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The paper's adaptive kernel size: the odd number nearest |log2(C) + b| / gamma, at least 3."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


def _kernel_size(attn: str, channels: int, kernel_size: int | None, gamma: float, beta: float) -> int:
    """``kernel_size`` if given (checked: odd, so every channel gets a gate), else the adaptive size."""
    if kernel_size is None:
        return eca_kernel_size(channels, gamma, beta)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise AttentionError(f"{attn}: kernel_size = {kernel_size!r} is not valid: an odd integer >= 1, so every "
                             "channel gets a gate (or leave it out for the paper's adaptive size)")
    return kernel_size


@register_attention("eca")
class EfficientChannelAttn(nn.Module):
    """ECA: global average pool, a 1-D convolution across channels, a channel gate.

    Arguments follow timm's ``EcaModule``. Where it differs: ``kernel_size=None`` (the
    default) means the paper's adaptive size from ``gamma`` and ``beta``, while an explicit
    ``kernel_size`` is used as given (timm ignores it whenever ``channels`` is set).

    Args:
        channels: input (and output) channels.
        kernel_size: odd kernel of the channel convolution; ``None`` for the adaptive size.
        gamma: gamma of the adaptive kernel size.
        beta: b of the adaptive kernel size.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        gamma: float = 2,
        beta: float = 1,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        kernel_size = _kernel_size("eca", channels, kernel_size, gamma, beta)
        self.conv = nn.Conv1d(
            1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False, device=device, dtype=dtype
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate the convolution starts at zero."""
        self.conv.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.conv)

    def scale(self, x: Tensor) -> Tensor:
        """The per-channel gate, shape ``(N, C, 1, 1)``."""
        s = x.mean((2, 3)).unsqueeze(1)  # (N, 1, C): channels become the 1-D sequence
        s = self.conv(s)
        return apply_gate(s, self.gate).transpose(1, 2).unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)


@register_attention("ecam")
class EfficientChannelAttnMlp(nn.Module):
    """ECA with a channel MLP (timm's ``ecam``): the pooled channel sequence is widened by a
    1x1 convolution to ``rd_channels`` feature maps, activated, and brought back to one by the
    ``k``-wide convolution across channels, then a channel gate.

    Not in the paper: an experiment of timm's (``EcaModule(use_mlp=True)``), whose arguments,
    defaults and state-dict keys this module has (``conv``: ``1 -> rd_channels``, kernel 1,
    biased; ``conv2``: ``rd_channels -> 1``, kernel ``k``, biased), so its weights load into
    it; the hidden width is timm's ``make_divisible(channels * rd_ratio, rd_divisor)``.
    ``gate="sigmoid"`` is timm's module exactly. The identity form starts ``conv2`` at zero
    under a ``2 * sigmoid`` gate (exactly 1.0 at init); ``conv2`` learns from the first
    step and ``conv`` from the second. Where it differs: ``kernel_size`` as in
    :class:`EfficientChannelAttn` (``None``, the default, is the paper's adaptive size; an
    explicit size is used, where timm ignores it), and the gate form.

    Args:
        channels: input (and output) channels.
        kernel_size: odd kernel of the convolution across channels; ``None`` for the adaptive size.
        gamma: gamma of the adaptive kernel size.
        beta: b of the adaptive kernel size.
        act_layer: activation between the two convolutions (class or timm name).
        rd_ratio: hidden width as a fraction of ``channels``.
        rd_channels: hidden width; overrides ``rd_ratio``.
        rd_divisor: round the hidden width to a multiple of this.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (timm's module).
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        gamma: float = 2,
        beta: float = 1,
        act_layer: type[nn.Module] | str = nn.ReLU,
        rd_ratio: float = 1.0 / 8,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        kernel_size = _kernel_size("ecam", channels, kernel_size, gamma, beta)
        check_reduction_args("ecam", {"rd_ratio": rd_ratio, "rd_channels": rd_channels, "rd_divisor": rd_divisor})
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor)  # timm's default round_limit, 0.9
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.conv = nn.Conv1d(1, rd_channels, 1, **dd)
        self.act = get_act_layer("ecam", act_layer)()
        self.conv2 = nn.Conv1d(rd_channels, 1, kernel_size, padding=(kernel_size - 1) // 2, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate ``conv2`` starts at zero."""
        self.conv.reset_parameters()
        self.conv2.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.conv2)

    def scale(self, x: Tensor) -> Tensor:
        """The per-channel gate, shape ``(N, C, 1, 1)``."""
        s = x.mean((2, 3)).unsqueeze(1)  # (N, 1, C): channels become the 1-D sequence
        s = self.conv2(self.act(self.conv(s)))
        return apply_gate(s, self.gate).transpose(1, 2).unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)


def _circular_problem(channels: int, kernel_size: int) -> str | None:
    pad = (kernel_size - 1) // 2
    if pad > channels:
        return (f"kernel_size = {kernel_size} pads {pad} channels circularly on each side, more than the "
                f"{channels} there are; give kernel_size <= {2 * channels + 1} or leave it out (adaptive)")
    return None


@register_attention("ceca")
class CircularEfficientChannelAttn(nn.Module):
    """Circular ECA (timm's ``ceca``): ECA whose convolution across channels pads circularly,
    so the first and last channels see ``k - 1`` neighbours like all others.

    Not in the paper: timm's ``CecaModule``, whose arguments, defaults and state-dict keys
    this module has (``conv``: ``1 -> 1``, kernel ``k``, unpadded, no bias), so its weights
    load into it. ``gate="sigmoid"`` is timm's module exactly. The identity form starts
    ``conv`` at zero under a ``2 * sigmoid`` gate (exactly 1.0 at init; it learns from the
    first step). Where it differs: timm's ``act_layer`` only switches on the convolution's
    bias (no activation is applied), so here that is ``bias``; ``kernel_size`` as in
    :class:`EfficientChannelAttn`; and the gate form.

    Args:
        channels: input (and output) channels.
        kernel_size: odd kernel of the circular convolution; ``None`` for the adaptive size.
        gamma: gamma of the adaptive kernel size.
        beta: b of the adaptive kernel size.
        bias: a bias in the convolution (timm: any ``act_layer``).
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (timm's module).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: an explicit ``kernel_size`` whose padding, ``(k - 1) / 2``, exceeds
            the channels (the plan skips such a site, see :meth:`site_problem`).
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add
    constraints = "with an explicit kernel_size, at least (kernel_size - 1) / 2 channels (circular padding)"

    def __init__(
        self,
        channels: int,
        kernel_size: int | None = None,
        gamma: float = 2,
        beta: float = 1,
        bias: bool = False,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        kernel_size = _kernel_size("ceca", channels, kernel_size, gamma, beta)
        problem = _circular_problem(channels, kernel_size)
        if problem is not None:
            raise AttentionError(f"ceca: {problem}")
        self.padding = (kernel_size - 1) // 2
        self.conv = nn.Conv1d(1, 1, kernel_size, bias=bias, device=device, dtype=dtype)
        self.reset_parameters()

    @classmethod
    def site_problem(cls, channels: int, size: tuple[int, int], kernel_size: int | None = None,
                     **_: object) -> str | None:
        """Why a site of ``channels`` cannot take this module (an explicit kernel too wide), or None."""
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool):
            return None  # the adaptive size always fits; a wrong value is the constructor's to name
        return _circular_problem(channels, kernel_size)

    def reset_parameters(self) -> None:
        """PyTorch's default init; with the identity gate the convolution starts at zero."""
        self.conv.reset_parameters()
        if self.gate == "identity":
            zero_init_(self.conv)

    def scale(self, x: Tensor) -> Tensor:
        """The per-channel gate, shape ``(N, C, 1, 1)``."""
        s = x.mean((2, 3)).unsqueeze(1)  # (N, 1, C)
        if self.padding:
            s = F.pad(s, (self.padding, self.padding), mode="circular")
        return apply_gate(self.conv(s), self.gate).transpose(1, 2).unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
