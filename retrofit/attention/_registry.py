"""The registry of attention types: a small dict behind a decorator."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..errors import AttentionError

__all__ = ["register_attention", "unregister_attention", "get_attention", "list_attention", "registered_types",
           "create_attention", "is_registered"]

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


def unregister_attention(name: str) -> type[nn.Module]:
    """Remove the type registered as ``name`` (a user's type, say, between tests); return it.

    Raises:
        AttentionError: nothing is registered under ``name``.
    """
    if name not in _ATTENTION:
        raise AttentionError(f"no attention registered as {name!r} (registered: {', '.join(list_attention())})")
    return _ATTENTION.pop(name)


def list_attention() -> list[str]:
    """Names of all registered attention types, sorted."""
    return sorted(_ATTENTION)


def registered_types() -> tuple[type[nn.Module], ...]:
    """The classes registered as attention types (built in, the user's, and ``module:Class``
    names imported so far): analysis recognises a module of these as existing attention, and
    the tracer keeps it whole."""
    return tuple(dict.fromkeys(_ATTENTION.values()))


def is_registered(name: str) -> bool:
    """Whether ``name`` is registered in this process (built in, registered by the user, or a
    ``module:Class`` already imported once): using it imports nothing."""
    return name in _ATTENTION


def _import_attention(spec: str) -> type[nn.Module]:
    """Import ``"package.module:ClassName"`` and register the class under that spec."""
    module_name, _, qualname = spec.partition(":")
    if not module_name or not qualname:
        raise AttentionError(f"attention {spec!r}: write an imported class as 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise AttentionError(
            f"attention {spec!r}: cannot import module {module_name!r} ({e}); is its package installed "
            "or on PYTHONPATH?"
        ) from e
    except Exception as e:
        raise AttentionError(f"attention {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    obj: object = module
    for part in qualname.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module))
            raise AttentionError(
                f"attention {spec!r}: module {module_name!r} has no {qualname!r} "
                f"(its nn.Module classes: {', '.join(names) or 'none'})"
            )
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise AttentionError(f"attention {spec!r}: {qualname} is a {type(obj).__name__}, not an nn.Module subclass")
    _ATTENTION[spec] = obj
    return obj


def get_attention(name: str) -> type[nn.Module]:
    """The class registered as ``name``, or imported from ``"package.module:ClassName"``.

    A name with a ``:`` is imported on first use and registered under that name, so rule
    files can name a user's class without registering it first. Other names match ignoring
    case where only one registered name does (``"SE"`` is ``"se"``).

    Raises:
        AttentionError: an unknown name (the message lists the valid ones), or a module or
            class that cannot be imported, or an imported object that is not an
            ``nn.Module`` subclass.
    """
    if name in _ATTENTION:
        return _ATTENTION[name]
    if ":" in name:
        return _import_attention(name)
    # "SE" in a rule file means "se" as it does on the command line; only where one name matches
    same = [k for k in _ATTENTION if ":" not in k and k.lower() == name.lower()]
    if len(same) == 1:
        return _ATTENTION[same[0]]
    close = difflib.get_close_matches(name, _ATTENTION, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise AttentionError(
        f"unknown attention {name!r}{hint} (valid: {', '.join(list_attention())}; "
        "or a class as 'package.module:ClassName')"
    )


def create_attention(name: str, channels: int, **kwargs: Any) -> nn.Module:
    """Build the attention registered as ``name`` for ``channels`` input channels."""
    cls = get_attention(name)
    try:
        return cls(channels, **kwargs)
    except AttentionError:
        raise
    except (TypeError, ValueError, RuntimeError) as e:
        # e.g. rd_channels=0, or an argument the class rejects for this channel count
        raise AttentionError(
            f"invalid arguments for attention {name!r} ({cls.__name__}) at {channels} channels: {e}"
        ) from e
