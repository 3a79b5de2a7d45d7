"""Where retrofit keeps what it knows about a model: its report, its recipe, and the class
it was built with.

A low layer (it imports nothing of retrofit's), so that the builders, the rewrite and the
persistence code all reach the same dict without importing each other.
"""

from __future__ import annotations

from typing import Any

import torch.fx
from torch import nn

__all__ = ["retrofit_meta", "original_class", "REPORT_KEY", "RECIPE_KEY", "META_ATTR", "ORIGINAL_CLASS_KEY"]

REPORT_KEY = "retrofit_report"
RECIPE_KEY = "retrofit_recipe"
META_ATTR = "retrofit_meta"  # the attribute that holds the dict
ORIGINAL_CLASS_KEY = "retrofit_original_class"  # GraphModule.meta: the class the model was built with
ORIGINAL_CLASS_ATTR = "_retrofit_original"  # on a class made for a module rewritten in place: the class it replaces


def retrofit_meta(module: nn.Module, create: bool = False) -> dict[str, Any]:
    """The dict where retrofit keeps a model's report and recipe.

    It is the module's attribute ``retrofit_meta``; on a ``GraphModule`` that attribute is
    its ``meta`` dict (torch.fx's place for such data). Both views are kept because each
    survives a different copy: ``copy.deepcopy`` of a GraphModule keeps ``meta`` and drops
    other attributes, pickling (``torch.save``) keeps attributes and empties ``meta``.
    Without ``create``, a module that has neither gets a new empty dict and is not changed.
    """
    meta = module.__dict__.get(META_ATTR)
    if meta is None:
        meta = module.meta if isinstance(module, torch.fx.GraphModule) else {}
        if create:
            module.__dict__[META_ATTR] = meta
    return meta


def original_class(module: nn.Module) -> type[nn.Module]:
    """The class ``module`` was built with, through what retrofit made of it: a module
    rewritten in place has a class made for it (its ``_retrofit_original`` names the one it
    replaces), and a GraphModule traced from a model records the model's class in its
    ``meta``. Any other module: its own class."""
    if isinstance(module, torch.fx.GraphModule):
        recorded = module.meta.get(ORIGINAL_CLASS_KEY)
        if isinstance(recorded, type):
            return recorded
    cls: type[nn.Module] = getattr(type(module), ORIGINAL_CLASS_ATTR, type(module))
    return cls
