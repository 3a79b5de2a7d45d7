"""The registry of attention types: a small dict behind a decorator."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from ..errors import AttentionError

__all__ = ["register_attention", "get_attention", "list_attention", "create_attention"]

_ATTENTION: dict[str, type[nn.Module]] = {}

_M = TypeVar("_M", bound=type[nn.Module])


def register_attention(name: str) -> Callable[[_M], _M]:
    """Register an attention class under ``name`` (usable as ``attn=name`` and in rule files).

    The class is built as ``cls(channels, gate=..., **args)`` and must return a tensor of
    its input's shape. Registering a name twice is an error.

    Example:
        >>> @register_attention("my_gate")
        ... class MyGate(nn.Module): ...
    """

    def _register(cls: _M) -> _M:
        if name in _ATTENTION:
            raise AttentionError(
                f"attention name {name!r} is already registered to {_ATTENTION[name].__qualname__}; "
                "choose another name"
            )
        _ATTENTION[name] = cls
        return cls

    return _register


def list_attention() -> list[str]:
    """Names of all registered attention types, sorted."""
    return sorted(_ATTENTION)


def get_attention(name: str) -> type[nn.Module]:
    """The class registered as ``name``; an unknown name lists the valid ones."""
    try:
        return _ATTENTION[name]
    except KeyError:
        close = difflib.get_close_matches(name, _ATTENTION, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise AttentionError(
            f"unknown attention {name!r}{hint} (valid: {', '.join(list_attention())})"
        ) from None


def create_attention(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the attention registered as ``name`` for ``channels`` input channels."""
    cls = get_attention(name)
    try:
        return cls(channels, **kwargs)
    except TypeError as e:
        raise AttentionError(f"invalid arguments for attention {name!r} ({cls.__name__}): {e}") from e
