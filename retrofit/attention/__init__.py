"""Attention modules, one paper per file, all registered by short name."""

from ._gate import GATES
from ._registry import create_attention, get_attention, list_attention, register_attention
from .cbam import Cbam
from .eca import EfficientChannelAttn, eca_kernel_size
from .se import SqueezeExcite

__all__ = [
    "GATES",
    "register_attention",
    "get_attention",
    "list_attention",
    "create_attention",
    "SqueezeExcite",
    "EfficientChannelAttn",
    "eca_kernel_size",
    "Cbam",
]
