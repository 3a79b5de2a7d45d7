"""Where retrofit keeps what it knows about a model: its report and its recipe.

A low layer (it imports nothing of retrofit's), so that the builders, the rewrite and the
persistence code all reach the same dict without importing each other.
"""

from __future__ import annotations

from typing import Any

import torch.fx
from torch import nn

__all__ = ["retrofit_meta", "REPORT_KEY", "RECIPE_KEY", "META_ATTR"]

REPORT_KEY = "retrofit_report"
RECIPE_KEY = "retrofit_recipe"
META_ATTR = "retrofit_meta"  # the attribute that holds the dict


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
