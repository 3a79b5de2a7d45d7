"""Attention classes defined outside the package, named in rule files as
``"tests.attention_helpers:ClassName"``."""

from __future__ import annotations

import torch
from torch import nn


class ChannelScale(nn.Module):
    """An identity at init: ``x * (1 + w)`` with ``w`` starting at zero."""

    def __init__(self, channels: int, gate: str = "identity", device=None, dtype=None) -> None:
        super().__init__()
        self.gate = gate
        self.w = nn.Parameter(torch.zeros(channels, 1, 1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.w)


class NotIdentity(nn.Module):
    """Not an identity at init: ``x + b`` with ``b`` starting at one."""

    def __init__(self, channels: int, gate: str = "identity", device=None, dtype=None) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.ones(channels, 1, 1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b


class NotAModule:
    """A class that is not an ``nn.Module``."""


NOT_A_CLASS = 3
