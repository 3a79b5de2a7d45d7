"""Leaf-module names checked against the model they are meant for.

``leaf_modules`` / ``--leaf-module`` accept a module path (``layer3.1``) or a class name
(``Bottleneck``); the tracer compares every module against them and a name that matches
nothing is simply never used, so a typo would go unnoticed and the module it meant would
be traced after all. :func:`check_leaf_modules` says so instead, naming the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import nn

from .errors import OptionError

__all__ = ["check_leaf_modules"]


def check_leaf_modules(model: nn.Module, leaf_modules: Iterable[type[nn.Module] | str]) -> None:
    """Raise unless every name in ``leaf_modules`` is a module path of ``model`` or the class
    name of one of its modules (classes are always accepted).

    Raises:
        OptionError: a name that matches nothing; the message gives the closest path or class
            name and examples of both.

    Example:
        >>> check_leaf_modules(timm.create_model("resnet18"), ["layer3.1", "BasicBlock"])
    """
    paths = [p for p, _ in model.named_modules() if p]
    classes = sorted({type(m).__name__ for m in model.modules()})
    for name in leaf_modules:
        if not isinstance(name, str) or name in classes or name in paths:
            continue
        close = difflib.get_close_matches(name, classes + paths, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        examples = ", ".join(repr(p) for p in paths[:1] + paths[-1:]) or "none"
        raise OptionError(
            f"leaf module {name!r} matches nothing in {type(model).__name__}{hint} (give a module path such as "
            f"{examples}, or the class name of a module in it: {', '.join(classes[:6])}"
            f"{', ...' if len(classes) > 6 else ''})"
        )
