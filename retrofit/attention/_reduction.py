"""The bottleneck width of an attention module, and the checks of the arguments that set it.

timm's attention modules all size their bottleneck from the same three arguments:
``rd_channels`` (the width itself) or ``rd_ratio`` (a fraction of the channels) rounded by
``rd_divisor``. :func:`make_divisible` is timm's formula, written out here so that building
an attention module does not import timm (about two seconds); :func:`check_reduction_args`
rejects values that would otherwise be rounded into a silent default (``rd_ratio = 0``
gives a width of ``rd_divisor``, not an error). Rule files are checked with it when they
are read, modules when they are built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any, TypeGuard

from ..errors import AttentionError

__all__ = ["make_divisible", "reduced_channels", "bottleneck_width", "check_reduction_args"]

REDUCTION_ARGS: tuple[str, ...] = ("rd_ratio", "rd_channels", "rd_divisor")


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's ``make_divisible``: ``v`` rounded to the nearest multiple of ``divisor``, at least
    ``min_value`` (default: ``divisor``), one step up if rounding lost more than
    ``1 - round_limit`` of ``v``.

    Example:
        >>> make_divisible(2048 / 16, 8, round_limit=0.0)
        128
    """
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def check_reduction_args(attn: str, args: Mapping[str, Any]) -> None:
    """Check the bottleneck arguments among ``args`` (the others are left alone).

    Args:
        attn: the attention's name, for the message.
        args: constructor arguments; ``rd_ratio`` must be a number > 0, ``rd_channels``
            None or an integer >= 1, ``rd_divisor`` an integer >= 1.

    Raises:
        AttentionError: a value out of range or of the wrong type, naming the argument,
            the value and what is valid.
    """
    if "rd_ratio" in args:
        v = args["rd_ratio"]
        # float(v): numbers.Real declares only < and <= to type checkers; `not ... > 0` rejects NaN too
        if isinstance(v, bool) or not isinstance(v, Real) or not float(v) > 0:
            raise AttentionError(
                f"{attn}: rd_ratio = {v!r} is not valid: it is the bottleneck width as a fraction of the "
                "channels, a number > 0 (e.g. 0.0625 for 1/16); or give the width itself as rd_channels"
            )
    if args.get("rd_channels") is not None:
        v = args["rd_channels"]
        if not _is_int(v) or v < 1:
            raise AttentionError(f"{attn}: rd_channels = {v!r} is not valid: the bottleneck width, an integer >= 1")
    if "rd_divisor" in args:
        v = args["rd_divisor"]
        if not _is_int(v) or v < 1:
            raise AttentionError(
                f"{attn}: rd_divisor = {v!r} is not valid: the width is rounded to a multiple of it, an integer >= 1"
            )


def reduced_channels(attn: str, channels: int, rd_ratio: float, rd_channels: int | None, rd_divisor: int) -> int:
    """The bottleneck width: ``rd_channels`` when given, else timm's
    ``make_divisible(channels * rd_ratio, rd_divisor, round_limit=0)``.

    Raises:
        AttentionError: see :func:`check_reduction_args`.
    """
    check_reduction_args(attn, {"rd_ratio": rd_ratio, "rd_channels": rd_channels, "rd_divisor": rd_divisor})
    if rd_channels is not None:
        return rd_channels
    return make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)


def floored_channels(channels: int, rd_ratio: float, rd_divisor: int = 1) -> int:
    """The bottleneck width as the official code of GAM, BAM and scSE computes it,
    ``channels // reduction``, in timm's terms: ``floor(channels * rd_ratio)`` rounded down
    to a multiple of ``rd_divisor``; 0 when the channels are too few (the caller decides).

    Example:
        >>> floored_channels(40, 1 / 16), floored_channels(96, 1 / 3)
        (2, 32)
    """
    # round() first: a ratio such as 1/3 is not exact in binary, and 96 * (1/3) must floor to 32.
    return math.floor(round(channels * rd_ratio, 9)) // rd_divisor * rd_divisor


def bottleneck_width(channels: int, rd_ratio: float, rd_channels: int | None, rd_divisor: int) -> tuple[int, str]:
    """The width of a bottleneck floored from ``rd_ratio`` (or ``rd_channels`` as given), and
    how it was found, for a message (BAM, scSE and GAM floor as their official code does)."""
    if rd_channels is not None:
        return rd_channels, "rd_channels"
    return floored_channels(channels, rd_ratio, rd_divisor), f"floor({channels} * {rd_ratio:g})"
