"""Site constraints: the channel counts an attention type can take, checked before a rewrite.

A type whose structure cannot fit every site (channel groups that must divide the channels,
a bottleneck that must keep one channel) declares it twice: a one-sentence ``constraints``
class attribute that ``retrofit list`` shows, and a classmethod
``site_problem(channels, size, **args) -> str | None`` that the planner asks for each site
(:func:`retrofit.planning.make_plan` skips a site it refuses, with the reason in the plan).
The constructor raises the same reason as an :class:`~retrofit.errors.AttentionError`.

``site_problem`` answers None for arguments it cannot judge (a groups value that is no
positive integer, say): building the module reports those, with the rule that gave them.
"""

from __future__ import annotations

from typing import TypeGuard

from ..errors import AttentionError
from ._reduction import bottleneck_width, check_reduction_args

__all__ = ["is_positive_int", "groups_problem", "width_problem", "bottleneck_problem", "check_positive_int"]


def is_positive_int(v: object) -> TypeGuard[int]:
    """Whether ``v`` is an integer >= 1 (a bool is not)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_positive_int(attn: str, name: str, v: object) -> int:
    """Return ``v`` if it is an integer >= 1, else raise naming the argument."""
    if not is_positive_int(v):
        raise AttentionError(f"{attn}: {name} = {v!r} is not valid: an integer >= 1")
    return v


def groups_problem(channels: int, groups: object, name: str, multiple: int = 1) -> str | None:
    """Why ``channels`` cannot be split into ``groups`` groups of ``multiple`` parts each, or None.

    Example:
        >>> groups_problem(48, 32, "factor")
        '48 channels are not divisible by factor = 32'
        >>> groups_problem(64, 64, "groups", multiple=2)
        '64 channels are not divisible by 2 * groups = 128 (each group is split in two halves)'
    """
    if not is_positive_int(groups):
        return None
    n = groups * multiple
    if channels % n == 0:
        return None
    if multiple == 1:
        return f"{channels} channels are not divisible by {name} = {groups}"
    return (f"{channels} channels are not divisible by {multiple} * {name} = {n} "
            f"(each group is split in two halves)")


def width_problem(channels: int, width: int, how: str) -> str | None:
    """Why a bottleneck of ``width`` channels (computed as ``how`` says) cannot be built, or None.

    Example:
        >>> width_problem(8, 0, "floor(8 * 1/16)")
        '8 channels leave a bottleneck of floor(8 * 1/16) = 0 channels; give rd_channels, or a larger rd_ratio'
    """
    if width >= 1:
        return None
    return (f"{channels} channels leave a bottleneck of {how} = {width} channels; give rd_channels, "
            "or a larger rd_ratio")


def bottleneck_problem(attn: str, channels: int, rd_ratio: float, rd_channels: int | None,
                       rd_divisor: int) -> str | None:
    """Why ``channels`` leave ``attn``'s floored bottleneck empty, or None; None too for
    reduction arguments the constructor rejects (it reports them)."""
    try:
        check_reduction_args(attn, {"rd_ratio": rd_ratio, "rd_channels": rd_channels, "rd_divisor": rd_divisor})
    except AttentionError:
        return None
    return width_problem(channels, *bottleneck_width(channels, rd_ratio, rd_channels, rd_divisor))
