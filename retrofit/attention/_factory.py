"""The ``device``/``dtype`` keyword arguments every attention module passes to its layers."""

from __future__ import annotations

from typing import TypedDict

import torch

__all__ = ["FactoryKwargs"]


class FactoryKwargs(TypedDict):
    """torch's ``factory_kwargs``, typed per key: a plain dict of both would be typed as their
    union, which no single layer argument accepts."""

    device: torch.device | str | None  # where to create the parameters
    dtype: torch.dtype | None  # their dtype
