"""The rewrite: the one place that changes a graph.

Inserting a module takes four steps (as torch's own FX passes do): pick a free attribute
name, install the module, move the graph's insertion point, create the ``call_module``
node and rewire the users. Each new module is created on the device and in the dtype of
the activation it will see, in the train/eval mode of the model.

With ``fuse`` (the default), a gating module that is the last thing on a residual branch
before an out-of-place add is not called as a module: its gate is computed alone and one
:func:`~retrofit.fuse.gated_residual` node replaces the module call and the add, saving a
full read and write of the activation. The module stays where it was installed (same
name, parameters and state-dict keys); the graph reaches it with a ``get_attr`` node.

A partition's root unit (the whole model) becomes the rewritten ``GraphModule``. Any other
unit is rewritten in place: the new modules are installed in the unit's own module, whose
class becomes a subclass of its class with the rewritten graph's generated ``forward``.
The module object stays where it is, with its class (``isinstance``), its methods, its
hooks and its place in containers; only its forward is the new code. (A subclass rather
than a forward set on the instance: the generated code then keeps working under
``copy.deepcopy``, pickling and FSDP, which all go through the class.)
"""

from __future__ import annotations

import copy
import keyword
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch.fx
from torch import nn

from .attention import create_attention, identity_error
from .errors import AttentionError, SiteError
from .frameworks import framework_of_class
from .fuse import gate_methods, gated_residual
from .partition import Partition
from .planning import Placement
from .sites import Site
from .trace import flattens_inputs

__all__ = ["rewrite"]


@dataclass(frozen=True)
class Inserted:
    """One module the rewrite added."""

    placement: Placement  # what the plan asked for
    name: str  # qualified name of the new submodule ("layer3.2.se")
    params: int  # parameters it added
    fused: bool = False  # its last gate's multiply is done by the residual add (a gated_residual node)


def _has_attr_path(root: nn.Module, path: str) -> bool:
    obj: object = root
    for part in path.split("."):
        if not hasattr(obj, part) or _none_slot(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _none_slot(obj: object, name: str) -> bool:
    """A plain attribute set to None, as timm's blocks keep an absent layer (``self.se = None``)."""
    return name in getattr(obj, "__dict__", {}) and obj.__dict__[name] is None


def _install(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_path, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if _none_slot(parent, leaf):
        # The slot a block keeps for an absent layer is where that layer belongs.
        del parent.__dict__[leaf]
    parent.add_module(leaf, module)


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


def _fusable_add(add: torch.fx.Node, attn: torch.fx.Node) -> torch.fx.Node | None:
    """The shortcut operand if ``add`` is an out-of-place ``attn + shortcut``, else None.

    In-place adds (``iadd``, ``add_``) write into an operand other nodes may read, ``out=``
    writes into a given tensor, and ``alpha`` scales a summand: those keep the module call.
    """
    if add.op == "call_function" and add.target in (operator.add, torch.add):
        if set(add.kwargs) - {"alpha"} or add.kwargs.get("alpha", 1) != 1:
            return None
    elif not (add.op == "call_method" and add.target == "add" and not add.kwargs):
        return None
    if len(add.args) != 2 or len(attn.users) != 1:
        return None
    a, b = add.args
    if a is attn and b is not attn:
        return b if isinstance(b, torch.fx.Node) else None
    if b is attn and a is not attn:
        return a if isinstance(a, torch.fx.Node) else None
    return None


# Modules whose output is a new tensor (no view of, or in-place write into, their input).
_FRESH_OUTPUT = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _not(node: torch.fx.Node) -> Callable[[torch.fx.Node], bool]:
    """A ``delete_user_cb`` that rewires every user but ``node`` itself."""
    return lambda user: user is not node


def _donatable(gm: torch.fx.GraphModule, branch: torch.fx.Node) -> bool:
    """Whether the fused add may write into ``branch``'s memory: a conv, a norm or a gating
    module (whose forward returns a new product) made it, and the attention is its only reader."""
    if branch.op != "call_module" or len(branch.users) != 1:
        return False
    module = gm.get_submodule(str(branch.target))
    return isinstance(module, _FRESH_OUTPUT) or gate_methods(module) is not None


def _fuse(gm: torch.fx.GraphModule, attn: torch.fx.Node, add: torch.fx.Node) -> bool:
    """Replace ``add(attn(branch), shortcut)`` with one ``gated_residual`` node; False if it cannot."""
    module = gm.get_submodule(str(attn.target))
    shortcut = _fusable_add(add, attn)
    if shortcut is None or gate_methods(module) is None:
        return False
    branch = attn.args[0]
    if not isinstance(branch, torch.fx.Node):
        return False
    with gm.graph.inserting_before(add):
        ref = gm.graph.get_attr(str(attn.target))
        new = gm.graph.call_function(gated_residual, (ref, branch, shortcut, _donatable(gm, branch)))
    ref.meta.update(attn.meta)
    new.meta.update(add.meta)
    add.replace_all_uses_with(new)
    gm.graph.erase_node(add)
    gm.graph.erase_node(attn)
    return True


def _unfuse(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node]:
    """Turn a ``gated_residual`` node back into its module call and add; return both nodes."""
    ref, branch, shortcut = node.args[:3]
    if not isinstance(ref, torch.fx.Node):
        raise TypeError(f"{node.name}: gated_residual's first argument is not a get_attr node")
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(str(ref.target), (branch,))
        add = gm.graph.call_function(operator.add, (call, shortcut))
    call.meta.update(ref.meta)
    add.meta.update(node.meta)
    node.replace_all_uses_with(add)
    gm.graph.erase_node(node)
    if not ref.users:
        gm.graph.erase_node(ref)
    return call, add


def insert_attention(
    gm: torch.fx.GraphModule, placements: tuple[Placement, ...], fuse: bool = True, check_identity: bool = True
) -> tuple[Inserted, ...]:
    """Insert one attention module per placement into ``gm``, in place.

    Residual-add sites with position ``branch`` get the module on the residual branch right
    before the add, ``mid`` right before the branch's last convolution; position ``after``
    (and conv-block sites) put it after the site's node, feeding all its former users.
    Several placements at one site and position are chained in order, after any module
    already there (a fused site from an earlier retrofit is unfused first, so its module
    runs before the new one, as on an unfused site). With ``fuse``, the
    module nearest an out-of-place residual add, when it is a gating module
    (:func:`~retrofit.fuse.gate_methods`), is fused into the add. The graph is linted and
    recompiled.

    Args:
        gm: the traced model; changed in place.
        placements: what to insert where, from the plan.
        fuse: fuse gating modules into residual adds (same outputs, less memory traffic).
        check_identity: refuse an identity-gate module that does not return its input
            exactly on a probe (a user type whose ``reset_parameters`` misses a layer).

    Returns:
        One record per placement, in order.

    Raises:
        SiteError: a site's tensor is not floating point, or its node is gone.
        AttentionError: with ``check_identity``, an identity-gate module is not an identity.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    # The node each (site, position) currently feeds from: stacked modules chain on it.
    cursor = _unfuse_stacked(gm, placements, nodes)
    done: list[Inserted] = []
    for p in placements:
        _check_site(p.site, nodes)
        module = _attention_module(p, check_identity)
        module.train(gm.training)
        name = _free_name(gm, _base_name(p))
        _install(gm, name, module)
        _wire(gm, p, name, nodes, cursor)
        done.append(Inserted(p, name, sum(t.numel() for t in module.parameters())))
    if fuse:
        # The last module on each residual branch feeds the add; the ones before it in a
        # chain feed a module, which needs their output.
        fused = {
            new.target
            for (node, position), new in cursor.items()
            if position == "branch" and node in nodes and _fuse(gm, new, nodes[node])
        }
        done = [replace(i, fused=True) if i.name in fused else i for i in done]
    gm.graph.lint()
    gm.recompile()
    return tuple(done)


def _unfuse_stacked(gm: torch.fx.GraphModule, placements: tuple[Placement, ...],
                    nodes: dict[str, torch.fx.Node]) -> dict[tuple[str, str], torch.fx.Node]:
    """Stacking on a fused site (an earlier retrofit): call the existing module again, so the
    new one runs after it, as on an unfused site; fusion then takes the new module, the last
    on the branch. Returns where each such ``(site node, "branch")`` now feeds from;
    ``nodes`` gets the new add."""
    cursor: dict[tuple[str, str], torch.fx.Node] = {}
    for p in placements:
        node = nodes.get(p.site.node)
        if p.position == "branch" and node is not None and node.target is gated_residual:
            cursor[(p.site.node, "branch")], nodes[p.site.node] = _unfuse(gm, node)
    return cursor


def _check_site(site: Site, nodes: dict[str, torch.fx.Node]) -> None:
    """Raises SiteError: the site's tensor is not floating point, or its node is gone."""
    if not site.dtype.is_floating_point:
        raise SiteError(f"site {site.qualname!r} carries a {site.dtype} tensor; attention needs floating point")
    if site.node not in nodes:
        raise SiteError(f"site {site.qualname!r}: node {site.node!r} is not in the graph")


def _attention_module(p: Placement, check_identity: bool) -> nn.Module:
    """The placement's module, on the device and in the dtype of its site's tensor.

    Raises:
        AttentionError: with ``check_identity``, an identity-gate module is not an identity.
    """
    site = p.site
    module = create_attention(p.attn, p.channels, gate=p.gate, device=site.device, dtype=site.dtype, **p.args)
    if check_identity and p.gate == "identity" and site.device.type != "meta":
        err = identity_error(module, p.channels, device=site.device, dtype=site.dtype)
        if err != 0.0:
            raise AttentionError(
                f"attention {p.attn!r} ({type(module).__name__}) at site {site.qualname!r} is not an identity "
                f"at init: max |out - in| = {err:.3g} on a (2, {p.channels}, 7, 5) probe; make its "
                "reset_parameters() start it at identity, use gate='sigmoid', or pass check_identity=False"
            )
    return module


def _wire(gm: torch.fx.GraphModule, p: Placement, name: str, nodes: dict[str, torch.fx.Node],
          cursor: dict[tuple[str, str], torch.fx.Node]) -> None:
    """Create the ``call_module`` node of the module installed at ``name`` where the
    placement puts it (after any module stacked there before), and rewire its users."""
    site = p.site
    key = (site.node, p.position)
    if p.position in ("branch", "mid"):
        at, before = (site.node, site.branch) if p.position == "branch" else (site.mid_conv, site.mid)
        if at is None or before is None:  # a plan puts "mid" only where the branch has a middle
            raise SiteError(f"site {site.qualname!r} has no {p.position!r} position")
        consumer = nodes[at]
        src = cursor.get(key) or nodes[before]
        with gm.graph.inserting_before(consumer):
            new = gm.graph.call_module(name, (src,))
        consumer.replace_input_with(src, new)
    else:
        anchor = cursor.get(key) or nodes[site.node]
        with gm.graph.inserting_after(anchor):
            new = gm.graph.call_module(name, (anchor,))
        anchor.replace_all_uses_with(new, delete_user_cb=_not(new))
    cursor[key] = new
    new.meta["module_path"] = site.module_path
    new.meta["qualname"] = name


def _restore_in_place(original: type[nn.Module], gm: torch.fx.GraphModule) -> nn.Module:
    """Unpickling and deep copies of a module rewritten in place: its class again, from
    the graph module :func:`_reduce_in_place` made (the state is set afterwards)."""
    obj = original.__new__(original)
    obj.__class__ = _in_place_class(original, gm)
    return obj


def _reduce_in_place(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    # A GraphModule of this very module and the rewritten graph: torch.fx pickles it as
    # source code, and shares this module's children with the state below.
    cls: Any = type(self)  # a class made by _in_place_class
    gm = torch.fx.GraphModule(self, copy.deepcopy(cls._retrofit_graph), cls.__name__)
    return _restore_in_place, (cls._retrofit_original, gm), self.__dict__


def _forward_after_fold(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The rewritten forward once a library has folded this module's batch norms into the
    convolutions before them and deleted them (the method its adapter names as
    ``folded_forward``): Ultralytics' fuse() (run by val, predict and export) does
    ``delattr(m, "bn"); m.forward = m.forward_fuse``, and the original ``forward_fuse``
    (``act(conv(x))``) would skip the attention inserted in the block."""
    for name in type(self)._retrofit_foldable:  # type: ignore[attr-defined]
        if name not in self._modules:
            self.add_module(name, nn.Identity())  # folded into the convolution: nothing left to do
    return type(self).forward(self, *args, **kwargs)


def _in_place_class(base: type[nn.Module], gm: torch.fx.GraphModule) -> type[nn.Module]:
    """A subclass of ``base`` (of its original class, for a module rewritten before) whose
    forward is ``gm``'s generated code; same name, module and docstring as the original."""
    original = vars(base)["_retrofit_original"] if "_retrofit_graph" in vars(base) else base
    namespace = {
        "forward": type(gm).forward,
        "_retrofit_original": original,  # the class the model was built with
        "_retrofit_graph": gm.graph,  # the rewritten graph, for pickling and deep copies
        "__reduce_ex__": _reduce_in_place,
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": original.__doc__,
    }
    if flattens_inputs(gm):
        namespace |= {"_in_spec": gm._in_spec, "_out_spec": gm._out_spec}
    framework = framework_of_class(original)
    folded = framework.folded_forward if framework is not None else None
    if folded is not None and callable(getattr(original, folded, None)):  # for after the norms are folded
        namespace |= {folded: _forward_after_fold, "_retrofit_foldable": tuple(
            n.target for n in gm.graph.nodes if n.op == "call_module" and "." not in str(n.target)
            and isinstance(gm.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm))}
    return type(original.__name__, (original,), namespace)


def rewritten_in_place(module: nn.Module) -> bool:
    """Whether ``module`` is a submodule retrofit rewrote in place (its forward is generated)."""
    return "_retrofit_graph" in type(module).__dict__


def rewrite(
    model: nn.Module,
    partition: Partition,
    placements: tuple[Placement, ...],
    fuse: bool = True,
    check_identity: bool = True,
) -> tuple[nn.Module, tuple[Inserted, ...]]:
    """Insert attention into the units of ``model``'s partition and put each changed unit in place.

    Placements carry sites in the model's namespace (from ``partition.analysis``); each is
    inserted into its unit's graph by :func:`insert_attention`. The root unit (a model that
    traced whole) is the result; any other unit that got a module is rewritten in place
    in ``model`` (see the module docstring), which is then the result. All graphs are
    rewritten before the first module changes, so an error leaves ``model`` as it was.

    Returns:
        The rewritten model, and one record per placement, in order; ``name`` is the
        module's path in the model.
    """
    by_unit: dict[str, list[tuple[int, Placement]]] = {}
    for k, p in enumerate(placements):
        by_unit.setdefault(partition.origin[p.site.ref].unit, []).append((k, p))
    records: dict[int, Inserted] = {}
    for path, items in by_unit.items():
        unit = partition.units[path]
        local = tuple(replace(p, site=partition.local(p.site)[1]) for _, p in items)
        for (k, p), done in zip(items, insert_attention(unit.gm, local, fuse, check_identity), strict=True):
            records[k] = replace(done, placement=p, name=f"{unit.path}.{done.name}" if unit.path else done.name)
    if partition.is_whole:
        result: nn.Module = partition.units[""].gm
    else:
        result = model
        for path, items in by_unit.items():
            unit = partition.units[path]
            target = model.get_submodule(unit.path)
            for k, _ in items:
                local_name = records[k].name[len(unit.path) + 1:]
                _install(target, local_name, unit.gm.get_submodule(local_name))
            target.__class__ = _in_place_class(type(target), unit.gm)
    return result, tuple(records[k] for k in sorted(records))
