"""The rewrite: the one place that changes a graph.

Inserting a module takes four steps (as torch's own FX passes do): pick a free attribute
name, install the module, move the graph's insertion point, create the ``call_module``
node and rewire the users. Each new module is created on the device and in the dtype of
the activation it will see, in the train/eval mode of the model.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass

import torch.fx
from torch import nn

from .attention import create_attention
from .errors import SiteError
from .plan import Placement

__all__ = ["Inserted", "insert_attention"]


@dataclass(frozen=True)
class Inserted:
    """One module the rewrite added."""

    placement: Placement  # what the plan asked for
    name: str  # qualified name of the new submodule ("layer3.2.se")
    params: int  # parameters it added


def _has_attr_path(root: nn.Module, path: str) -> bool:
    obj: object = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _free_name(gm: torch.fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while _has_attr_path(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


_SUFFIX = {"branch": "", "mid": "_mid", "after": "_out"}


def _attr(attn: str) -> str:
    """A Python identifier for an attention name ("nonlocal" is a keyword; "pkg.mod:Cls" has colons)."""
    name = re.sub(r"\W", "_", attn.rpartition(":")[2]).lower()
    return f"{name}_" if keyword.iskeyword(name) or not name.isidentifier() else name


def _base_name(p: Placement) -> str:
    site = p.site
    if site.kind == "conv-block":
        return f"{site.path}_{_attr(p.attn)}"
    leaf = f"{_attr(p.attn)}{_SUFFIX[p.position]}"
    return f"{site.module_path}.{leaf}" if site.module_path else leaf


def insert_attention(gm: torch.fx.GraphModule, placements: tuple[Placement, ...]) -> tuple[Inserted, ...]:
    """Insert one attention module per placement into ``gm``, in place.

    Residual-add sites with position ``branch`` get the module on the residual branch right
    before the add, ``mid`` right before the branch's last convolution; position ``after``
    (and conv-block sites) put it after the site's node, feeding all its former users.
    Several placements at one site and position are chained in order. The graph is linted
    and recompiled.

    Raises:
        SiteError: a site's tensor is not floating point, or its node is gone.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    # The node each (site, position) currently feeds from: stacked modules chain on it.
    cursor: dict[tuple[str, str], torch.fx.Node] = {}
    done: list[Inserted] = []
    for p in placements:
        site = p.site
        if not site.dtype.is_floating_point:
            raise SiteError(f"site {site.qualname!r} carries a {site.dtype} tensor; attention needs floating point")
        if site.node not in nodes:
            raise SiteError(f"site {site.qualname!r}: node {site.node!r} is not in the graph")
        module = create_attention(p.attn, p.channels, gate=p.gate, device=site.device, dtype=site.dtype, **p.args)
        module.train(gm.training)
        name = _free_name(gm, _base_name(p))
        gm.add_submodule(name, module)
        key = (site.node, p.position)
        if p.position in ("branch", "mid"):
            consumer = nodes[site.node] if p.position == "branch" else nodes[site.mid_conv]  # type: ignore[index]
            src = cursor.get(key) or nodes[site.branch if p.position == "branch" else site.mid]  # type: ignore[index]
            with gm.graph.inserting_before(consumer):
                new = gm.graph.call_module(name, (src,))
            consumer.replace_input_with(src, new)
        else:
            anchor = cursor.get(key) or nodes[site.node]
            with gm.graph.inserting_after(anchor):
                new = gm.graph.call_module(name, (anchor,))
            anchor.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        cursor[key] = new
        new.meta["module_path"] = site.module_path
        new.meta["qualname"] = name
        done.append(Inserted(p, name, sum(t.numel() for t in module.parameters())))
    gm.graph.lint()
    gm.recompile()
    return tuple(done)
