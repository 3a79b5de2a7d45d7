"""The partition: the model split into units that torch.fx traces, each rewritten where it is.

One path serves every model. A model whose forward traces is the partition with one unit,
the root: its rewrite is a ``GraphModule`` (the default result). When the model's own
forward does not trace (data-dependent Python control flow, a ``.item()`` in a branch), or
when the caller keeps the model's class (``keep_class=True``: ``forward_features``,
``reset_classifier`` and the module tree stay), the forward stays Python code and the units
are submodules, each rewritten in place.

Submodule units are as small as they can be: the module whose forward holds a site's
insertion point (a residual block for the add at its end, a container for a chain of
layers it calls), found from the largest pieces that trace (the root, or else the largest
traceable submodules) by tracing each such module alone with the inputs a probe forward
(:mod:`retrofit.probe`) recorded for it. A unit whose own trace does not give the same
sites moves up to its parent. Sites of all units are planned together, with paths and stages in the model's own
namespace, so rules read exactly as for a whole-model rewrite. A site is named across the
passes by its :class:`~retrofit.sites.SiteRef` (the unit's module path and the node in its
graph); units are keyed by module path.

Analysis here reads only; :mod:`retrofit.rewrite` still does every change.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from .errors import TraceError, first_line
from .meta import original_class
from .probe import Call, Flow, Probe, TensorId, one_call, probe
from .shapes import propagate_shapes
from .sites import Site, SiteAnalysis, SiteRef, SkippedCandidate, find_sites, holds_conv, number_stages
from .trace import LeafSpec, RetrofitTracer, flattens_inputs, optional_defaults, relative_leaves, trace

__all__ = ["Partition", "partition", "refine", "slim"]

# Traces of one module, at most, while finding which of its submodules to call whole (they
# do not trace) or to trace into (its code needs their results as Python values).
_MAX_RETRACES = 64


@dataclass(frozen=True)
class Unit:
    """A module that traced: its graph, and its sites in its own namespace."""

    path: str  # module path in the model; "" is the root (the whole model traced)
    gm: torch.fx.GraphModule  # the traced module (shares the model's submodules)
    analysis: SiteAnalysis  # sites with paths relative to the unit (each site's `unit` is `path`)
    opaque: tuple[str, ...] = ()  # submodules (paths relative to it) called whole: their own forward does not trace


def _unit_notes(units: Collection[Unit]) -> tuple[str, ...]:
    """The tracer notes of the units (train/eval-dependent code), each named by its unit."""
    return tuple(f"{u.path}: {n}" if u.path else n for u in units for n in u.gm.meta.get("retrofit_trace_notes", ()))


@dataclass(frozen=True, kw_only=True)
class Partition:
    """The model split into traced units and code left as it is.

    Built by :meth:`whole` (the model traced as one unit) or :meth:`split` (units are
    submodules, the model's own forward stays Python code).
    """

    units: Mapping[str, Unit]  # traced modules by module path, in module-tree order; {"": root} when whole
    analysis: SiteAnalysis  # every unit's sites, paths in the model's namespace, stages over the model
    origin: Mapping[SiteRef, Site]  # site (as `analysis` names it) -> the same site in its unit's namespace
    notes: tuple[str, ...] = ()  # tracer notes of the units (train/eval-dependent code)
    root_error: TraceError | None = None  # why the model's own forward did not trace, if it did not
    whole_analysis: SiteAnalysis | None = None  # keep_class: the whole model's sites, out-of-reach ones included
    calls: dict[str, list[Call]] | None = None  # inputs each submodule got in the probe forward (not whole)
    leaf_modules: tuple[LeafSpec, ...] = ()  # what the units were traced with
    probe_fallback: str | None = None  # why the probe forward ran on zeros, not fake tensors (it failed on them)

    @classmethod
    def whole(cls, root: Unit) -> Partition:
        """The model traced as a whole: one root unit, rewritten into a GraphModule."""
        return cls(units={"": root}, analysis=root.analysis, origin={s.ref: s for s in root.analysis.sites},
                   notes=_unit_notes([root]))

    @classmethod
    def split(cls, *, units: Sequence[Unit], analysis: SiteAnalysis, origin: Mapping[SiteRef, Site], seen: Probe,
              leaf_modules: tuple[LeafSpec, ...], root_error: TraceError | None = None,
              whole_analysis: SiteAnalysis | None = None) -> Partition:
        """Units that are submodules (or, with ``keep_class``, the root kept as Python code),
        each rewritten in place; ``seen`` is the probe forward their inputs came from."""
        return cls(units={u.path: u for u in units}, analysis=analysis, origin=dict(origin),
                   notes=_unit_notes(units), root_error=root_error, whole_analysis=whole_analysis,
                   calls=seen.calls, leaf_modules=leaf_modules, probe_fallback=seen.fake_failure)

    @property
    def is_whole(self) -> bool:
        """The model traced as a whole: one root unit, rewritten into a GraphModule."""
        return self.calls is None

    @property
    def left_alone(self) -> tuple[tuple[str, str], ...]:
        """``(module path, why it was not traced)``; ``""`` is the top level."""
        return self.analysis.left_alone

    def local(self, site: Site) -> tuple[Unit, Site]:
        """The unit holding ``site`` and the site in that unit's namespace (stage kept)."""
        orig = self.origin[site.ref]
        return self.units[orig.unit], replace(orig, stage=site.stage, block=site.block)


def _placeholder_inputs(gm: torch.fx.GraphModule, mod: nn.Module, call: Call) -> tuple[Any, ...]:
    """One value per placeholder of ``gm``, from a recorded call (positional, keyword, default)."""
    args, kwargs = call
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if flattens_inputs(gm):
        # Inputs traced as structures of placeholders (a size tuple, see _sizes_as_placeholders):
        # the placeholders are the leaves of the inputs, in order.
        try:
            bound = inspect.signature(mod.forward).bind(*args, **kwargs)
        except TypeError as e:
            raise TraceError(f"the recorded inputs do not fit the forward of {type(mod).__name__}: {e}") from e
        bound.apply_defaults()
        leaves = pytree.tree_leaves(tuple(bound.arguments.values()))
        if len(leaves) != len(placeholders):
            raise TraceError(f"{len(leaves)} recorded input value(s) for {len(placeholders)} graph input(s)")
        return tuple(leaves)
    values: list[Any] = []
    named = {str(n.target).lstrip("*") for n in placeholders}
    for i, node in enumerate(placeholders):
        name = str(node.target).lstrip("*")
        if str(node.target).startswith("**"):  # forward(x, **kwargs): the keywords no other input took
            values.append({k: v for k, v in kwargs.items() if k not in named})
        elif str(node.target).startswith("*"):
            values.append(tuple(args[i:]))
        elif i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        elif node.args:
            values.append(node.args[0])
        else:
            raise TraceError(f"no recorded value for input {name!r}")
    return tuple(values)


def _arguments(mod: nn.Module, call: Call) -> inspect.BoundArguments | None:
    """A recorded call bound, as far as it goes, to the names of ``mod``'s forward; None if
    it does not fit."""
    try:
        return inspect.signature(mod.forward).bind_partial(*call[0], **call[1])
    except TypeError:
        return None


def _concrete(mod: nn.Module, call: Call) -> dict[str, Any]:
    """Optional inputs the model passes as None or a bool (or not at all) keep that value
    while tracing; the generated forward asserts they keep it."""
    bound = _arguments(mod, call)
    if bound is None:
        return {}
    out: dict[str, Any] = {}
    for k, default in optional_defaults(mod).items():
        value = bound.arguments.get(k, default)
        if value is None or type(value) is bool:
            out[k] = value
    return out


def _sizes_as_placeholders(mod: nn.Module, call: Call) -> dict[str, Any]:
    """Inputs (past the first) the model passes as a tuple or list of ints, a spatial size
    (Twins' ``PosConv.forward(x, size)``), traced as one placeholder per int.

    A single proxy for ``size`` breaks at ``view(B, C, *size)`` or ``H, W = size``; one
    per element keeps the graph valid for every size (fixing the values would specialize
    it to the probe's resolution). Used only when the module does not trace otherwise, so
    modules that do keep their graphs as they were.
    """
    bound = _arguments(mod, call)
    if bound is None:
        return {}
    return {k: type(v)(torch.fx.PH for _ in v) for k, v in list(bound.arguments.items())[1:]
            if isinstance(v, (tuple, list)) and v and all(type(i) is int for i in v)}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _prefixed(site: Site, prefix: str) -> Site:
    """A unit's site with its paths in the model's namespace (its nodes stay the unit's)."""
    return replace(
        site,
        path=_join(prefix, site.path),
        module_path=_join(prefix, site.module_path),
        qualname=_join(prefix, site.qualname),
        layers=tuple(_join(prefix, q) for q in site.layers),
    )


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _within(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def _common(a: str, b: str) -> str:
    out: list[str] = []
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


def _anchor(site: Site, gm: torch.fx.GraphModule) -> str:
    """The module (path local to ``gm``) whose forward holds where attention goes at ``site``:
    the add's module (and, for the branch's middle, the module calling its last conv); the
    module calling a conv block's last layer."""
    if site.kind == "residual-add" and site.mid_conv is not None:
        nodes = {n.name: n for n in gm.graph.nodes}
        mid = nodes[site.mid_conv].meta.get("module_path", "") if site.mid_conv in nodes else ""
        return _common(site.module_path, mid)
    return site.module_path


class _SameSite(NamedTuple):
    """What identifies a site across traces of nested modules (torch.fx names nodes the same
    way whichever module the trace starts from), where node names differ."""

    kind: str  # the site's kind
    qualname: str  # its node's readable name in the model
    channels: int  # channels attention sees
    size: tuple[int, int]  # and their spatial size


def _same(site: Site) -> _SameSite:
    """The identity across traces of a site in its unit's namespace."""
    return _SameSite(site.kind, _join(site.unit, site.qualname), site.channels, site.size)


def _trace_unit(model: nn.Module, path: str, call: Call, leaf_modules: Sequence[LeafSpec],
                into: Collection[str] | None = None) -> Unit:
    """Trace the submodule at ``path`` alone, on the inputs it was called with (into the
    module paths ``into``, relative to it, only, when given).

    Raises:
        TraceError: it does not trace, or its shapes do not propagate.
    """
    mod = model.get_submodule(path)
    leaves, concrete = relative_leaves(leaf_modules, path), _concrete(mod, call)
    opaque: list[str] = []
    for _ in range(_MAX_RETRACES):
        try:
            gm = trace(mod, (*leaves, *opaque), concrete, into)
            break
        except TraceError as first:
            # A submodule whose own forward does not trace (shape-dependent padding, a
            # branch on values) is called whole; the rest of this forward may trace.
            if first.module and first.module not in opaque:
                opaque.append(first.module)
                continue
            sizes = _sizes_as_placeholders(mod, call)
            if not sizes:
                raise
            try:
                gm = trace(mod, (*leaves, *opaque), {**concrete, **sizes}, into)
                break
            except TraceError:
                raise first from None  # the error of the plain trace says where the forward breaks
    else:
        raise TraceError(f"{type(mod).__name__} at {path!r} does not trace in {_MAX_RETRACES} tries, each calling "
                         f"whole one more submodule that does not trace ({', '.join(opaque[:3])}, ...)")
    analysis = find_sites(gm, propagate_shapes(gm, None, inputs=_placeholder_inputs(gm, mod, call)), unit=path)
    return Unit(path, gm, analysis, tuple(opaque))


def _called_as_unit(model: nn.Module, mod: nn.Module, path: str, calls: dict[str, list[Call]],
                    leaf_modules: Sequence[LeafSpec]) -> tuple[Unit | None, str | None, bool]:
    """Whether the submodule at ``path`` (never the root) is a unit: ``(the unit, or None;
    why it is left alone, or None; whether its children are to be tried)``."""
    recorded = calls.get(path, [])
    if not recorded:
        # A container the forward iterates (an nn.Sequential or ModuleList run in a Python
        # loop, as YOLO's and ConvNeXt's stages are) is never called itself; the modules in
        # it are.
        called_inside = any(calls.get(_join(path, sub)) for sub, _ in mod.named_modules() if sub)
        return None, None if called_inside else "not called on the probe input", called_inside
    call = one_call(calls, path)
    if call is None:
        return None, f"called {len(recorded)} times with different inputs; its children are tried", True
    try:
        return _trace_unit(model, path, call, leaf_modules), None, False
    except TraceError as e:
        return None, first_line(e), True


def _largest_units(model: nn.Module, calls: dict[str, list[Call]], leaf_modules: Sequence[LeafSpec],
                   root_reason: str) -> tuple[list[Unit], list[tuple[str, str]]]:
    """From the top down, each submodule that traces is a unit; one that does not is left
    as Python code while its children are tried. The root is never one."""
    tracer = RetrofitTracer(leaf_modules)
    units: list[Unit] = []
    left: list[tuple[str, str]] = [("", root_reason)]

    def visit(mod: nn.Module, path: str) -> None:
        if not holds_conv(mod):
            return  # no convolution, no site
        # torch.fx counts ModuleList and ModuleDict as built-in leaves; they are never
        # called, and the modules in them are the ones to reach.
        if not isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and tracer.is_leaf_module(mod, path):
            # Built-in layers hold no sites of their own; other leaves are opaque by request.
            if not type(mod).__module__.startswith("torch.nn"):
                left.append((path, f"leaf module ({type(mod).__name__}); not traced into"))
            return
        unit, why, descend = _called_as_unit(model, mod, path, calls, leaf_modules)
        if why is not None:
            left.append((path, why))
        if unit is not None:
            units.append(unit)
            for sub in unit.opaque:  # called whole by the unit; what is inside may trace alone
                visit(model.get_submodule(_join(path, sub)), _join(path, sub))
        if descend:
            for name, child in mod.named_children():
                visit(child, _join(path, name))

    for name, child in model.named_children():
        visit(child, name)
    return units, left


def _try_anchors(model: nn.Module, anchors: Collection[str], calls: dict[str, list[Call]],
                 leaf_modules: Sequence[LeafSpec], tried: dict[str, Unit | None]) -> None:
    """Trace each module of ``anchors`` not tried yet alone, into ``tried``: None for one
    that was not called once with the same inputs, or does not trace alone (its sites then
    move to its parent)."""
    for a in sorted(anchors):
        if a in tried:
            continue
        call = one_call(calls, a)
        try:
            tried[a] = None if call is None else _trace_unit(model, a, call, leaf_modules)
        except TraceError:
            tried[a] = None


def _outermost(at: dict[str, str], top: str, tried: dict[str, Unit | None]) -> dict[str, str]:
    """Sites (by node) whose anchor lies inside another anchor that traced, moved to the
    outermost such anchor: it is rewritten with the others inside it. The root's forward is
    never a unit."""
    traced = {a for a in at.values() if a == top or tried[a] is not None} - {""}
    moved: dict[str, str] = {}
    for n, a in at.items():
        outer = [b for b in traced if b != a and _within(a, b)]
        if outer:
            moved[n] = min(outer, key=len)
    return moved


def _hand_up(sites: Sequence[Site], at: dict[str, str], lost: set[str], top: str,
             tried: dict[str, Unit | None]) -> bool:
    """Move each site whose anchor did not trace, or whose own trace did not give the site,
    to the anchor's parent (at most the coarse unit ``top``); a site at the root is out of
    reach (into ``lost``). Whether any site moved."""
    found: dict[str, set[_SameSite]] = {}
    changed = False
    for s in sites:
        a = at[s.node]
        if s.node in lost or a == top:
            if a == top == "":
                lost.add(s.node)
            continue
        unit = tried[a]
        if unit is not None and a not in found:
            found[a] = {_same(x) for x in unit.analysis.sites}
        if unit is None or _same(s) not in found[a]:
            at[s.node] = _parent(a) if _within(_parent(a), top) else top
            changed = True
    return changed


def _refine(model: nn.Module, coarse: Unit, sites: Sequence[Site], calls: dict[str, list[Call]],
            leaf_modules: Sequence[LeafSpec], tried: dict[str, Unit | None]) -> tuple[dict[SiteRef, Site], list[Site]]:
    """Split a traced unit into the smallest units that hold ``sites`` (its own, local).

    Each site starts at its anchor module (:func:`_anchor`). A module that does not trace
    alone, or whose own trace does not give the site, hands it to its parent; a module
    that traces and lies inside another that traces and holds sites is rewritten as part
    of that one. A module that does not trace does not take in the modules below it: their
    sites stay where they trace (HRNet's branch blocks, below a module whose forward
    indexes a list, are reached alone). At the coarse unit itself a site stays in the
    coarse unit, except at the root, whose forward stays Python code: such a site is out of
    reach.

    Returns:
        The coarse-local site's reference -> the site in the namespace of the unit it moved
        to (its ``unit``; the unit is ``coarse`` or one of ``tried``), and the coarse-local
        sites out of reach.
    """
    top = coarse.path
    at: dict[str, str] = {s.node: _join(top, _anchor(s, coarse.gm)) for s in sites}
    lost: set[str] = set()
    while True:
        live = {n: a for n, a in at.items() if n not in lost}
        _try_anchors(model, set(live.values()) - {top}, calls, leaf_modules, tried)
        at.update(_outermost(live, top, tried))
        if not _hand_up(sites, at, lost, top, tried):
            break
    placed: dict[SiteRef, Site] = {}
    for s in sites:
        if s.node in lost:
            continue
        unit = coarse if at[s.node] == top else tried[at[s.node]]
        assert unit is not None  # only anchors that traced and gave the site keep it
        placed[s.ref] = s if unit is coarse else next(x for x in unit.analysis.sites if _same(x) == _same(s))
    return placed, [s for s in sites if s.node in lost]


def _root_unit(model: nn.Module, input_size: tuple[int, int, int],
               leaf_modules: tuple[LeafSpec, ...]) -> tuple[Unit | None, TraceError | None, bool]:
    """The model traced whole as the root unit, or why it did not trace; and whether it
    traced (its shapes may still have failed)."""
    try:
        gm = trace(model, leaf_modules)
    except TraceError as e:
        return None, e, False
    try:
        return Unit("", gm, find_sites(gm, propagate_shapes(gm, input_size))), None, True
    except TraceError as e:
        return None, e, True


def _kept_root(model: nn.Module, root: Unit, seen: Probe, leaf_modules: tuple[LeafSpec, ...]) -> Partition:
    """``keep_class`` on a model that traces: the root's graph is the unit the sites are
    found in, but its forward stays Python code, so a site written in it is out of reach."""
    left = (("", f"the forward of {type(model).__name__} stays Python code (keep_class)"),)
    # Stages and blocks as in the whole-model rewrite: the root's own numbering.
    reachable = tuple(s for s in root.analysis.sites if _anchor(s, root.gm) != "")
    return Partition.split(units=[root], analysis=SiteAnalysis(reachable, root.analysis.skipped, left),
                           origin={s.ref: s for s in reachable}, seen=seen, leaf_modules=leaf_modules,
                           whole_analysis=root.analysis)


def _submodule_units(model: nn.Module, seen: Probe, leaf_modules: tuple[LeafSpec, ...],
                     root_error: TraceError | None) -> Partition:
    """The largest submodules that trace as units; the model's own forward stays Python code."""
    why = f"does not trace: {root_error.where}" if root_error is not None else "kept as Python code"
    units, left = _largest_units(model, seen.calls, leaf_modules, why)
    origin = {s.ref: s for u in units for s in u.analysis.sites}
    sites = number_stages([_prefixed(s, u.path) for u in units for s in u.analysis.sites])
    skipped: list[SkippedCandidate] = [replace(c, qualname=_join(u.path, c.qualname))
                                       for u in units for c in u.analysis.skipped]
    return Partition.split(units=units, analysis=SiteAnalysis(sites, tuple(skipped), tuple(left)), origin=origin,
                           seen=seen, leaf_modules=leaf_modules, root_error=root_error)


def partition(
    model: nn.Module,
    input_size: tuple[int, int, int],
    leaf_modules: Sequence[LeafSpec] = (),
    keep_class: bool = False,
    flow: bool = False,
) -> Partition:
    """Split ``model`` into the pieces that trace, and analyse them.

    The root is tried first: a model that traces as a whole is one root unit (unless
    ``keep_class``). Otherwise a probe forward records every submodule's inputs and the
    units are the largest submodules that trace; :func:`refine` then narrows them to the
    smallest modules holding the sites the plan selects.

    Args:
        model: the model (not modified).
        input_size: ``(C, H, W)`` for shapes and for the probe.
        leaf_modules: modules not to trace into (classes, class names, module paths).
        keep_class: never make the root a unit; the model's own forward stays as it is.
            Its sites (a residual add written in that forward) are out of reach and left
            out of ``analysis``; ``whole_analysis`` has them.
        flow: fill each site's ``output_of`` / ``input_of`` (the modules that return its
            tensor or take it), from a probe forward; rules that select by them need it.

    Returns:
        The units, the modules left alone with the reason, and the sites.

    Raises:
        TraceError: the model does not run on the probe input.
    """
    leaf_modules = tuple(leaf_modules)
    root, root_error, traced = _root_unit(model, input_size, leaf_modules)
    if root is not None and not keep_class:
        whole = Partition.whole(root)
        return _with_flow(model, whole, probe(model, input_size).flow) if flow else whole
    try:
        seen = probe(model, input_size)
    except TraceError:
        if traced and root_error is not None:
            raise root_error from None  # it traced, its shapes failed: the node named is what to fix
        raise  # it does not run on the input at all (whatever else stops its trace)
    if root is not None:
        parts = _kept_root(model, root, seen, leaf_modules)
    else:
        parts = _submodule_units(model, seen, leaf_modules, root_error)
    return _with_flow(model, parts, seen.flow) if flow else parts


def _returned(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return node in pytree.tree_leaves(output.args[0])


def _by_tensor(per_module: dict[str, list[set[TensorId]]]) -> dict[TensorId, list[str]]:
    """Module paths by the tensors they took (or returned) in the probe."""
    out: dict[TensorId, list[str]] = {}
    for path, per_call in per_module.items():
        for call_ids in per_call:
            for i in call_ids:
                out.setdefault(i, []).append(path)
    return out


def _site_tensor(unit: Unit, local: Site, flow: Flow) -> set[TensorId]:
    """The probe's tensor at a site (in its unit's namespace), when known: the output of a
    module called once that its node calls, or what its unit returns."""
    node = next((n for n in unit.gm.graph.nodes if n.name == local.node), None)
    ids: set[TensorId] = set()
    if node is not None and node.op == "call_module":
        calls = flow.outputs.get(_join(unit.path, str(node.target)), [])
        ids = calls[0] if len(calls) == 1 else set()
    if not ids and node is not None and _returned(unit.gm, node):
        calls = flow.outputs.get(unit.path, [])
        ids = calls[0] if len(calls) == 1 else set()
    return ids


def _with_flow(model: nn.Module, parts: Partition, flow: Flow) -> Partition:
    """Each site's ``output_of`` / ``input_of``: the modules (``"path (Class)"``) that return
    its tensor or take it, found by the identity of the tensors of a probe forward. A site's
    tensor is known when its node calls a module called once (its output), or when it is
    what its unit returns."""
    classes: dict[str, str] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        classes.setdefault(path, original_class(mod).__name__)
    made_by, taken_by = _by_tensor(flow.outputs), _by_tensor(flow.inputs)

    def named(paths: list[str]) -> tuple[str, ...]:
        return tuple(f"{p or '(top level)'} ({classes.get(p, '?')})" for p in dict.fromkeys(paths))

    sites: list[Site] = []
    origin = dict(parts.origin)
    for site in parts.analysis.sites:
        local = parts.origin[site.ref]
        ids = _site_tensor(parts.units[local.unit], local, flow)
        made = named([p for i in ids for p in made_by.get(i, [])])
        taken = named([p for i in ids for p in taken_by.get(i, [])])
        sites.append(replace(site, output_of=made, input_of=taken))
        origin[site.ref] = replace(local, output_of=made, input_of=taken)
    return replace(parts, analysis=replace(parts.analysis, sites=tuple(sites)), origin=origin)


def refine(model: nn.Module, parts: Partition, sites: Sequence[Site]) -> tuple[Partition, tuple[Site, ...]]:
    """Narrow a partition to the smallest units that hold ``sites`` (the ones a plan selected).

    A model that traced as a whole stays one root unit. Otherwise each site moves to the
    module whose forward holds its insertion point (:func:`_anchor`): a module inside
    another such module is rewritten as part of it; one that does not trace alone, or
    whose own trace does not give the site, hands it to its parent; at the piece it was
    found in, it stays there, except at the root (``keep_class``), whose forward stays
    Python code.

    Returns:
        The narrowed partition (``origin`` covers ``sites`` only), and the sites that
        turned out to be out of reach.
    """
    calls = parts.calls
    if calls is None:  # parts.is_whole: one root unit, nothing to narrow
        return parts, ()
    by_unit: dict[str, list[Site]] = {}
    for site in {s.ref: s for s in sites}.values():  # stacked placements name one site more than once
        local = parts.origin[site.ref]
        by_unit.setdefault(local.unit, []).append(local)
    tried: dict[str, Unit | None] = {}
    placed: dict[SiteRef, Site] = {}  # coarse-local site -> the site in its fine unit
    lost: set[SiteRef] = set()
    for path, local_sites in by_unit.items():
        fine, out = _refine(model, parts.units[path], local_sites, calls, parts.leaf_modules, tried)
        placed.update(fine)
        lost.update(s.ref for s in out)
    held = {p: u for p, u in tried.items() if u is not None} | dict(parts.units)
    tree = {name: i for i, (name, _) in enumerate(model.named_modules())}
    units = {p: held[p] for p in sorted({s.unit for s in placed.values()}, key=tree.__getitem__)}
    origin = {s.ref: placed[parts.origin[s.ref].ref] for s in sites if parts.origin[s.ref].ref not in lost}
    unreachable = tuple(s for s in sites if parts.origin[s.ref].ref in lost)
    return replace(parts, units=units, origin=origin, notes=_unit_notes(units.values())), unreachable


def _closure(paths: Collection[str]) -> set[str]:
    """The paths and every module above them, the unit itself (``""``) included."""
    out = {""}
    for p in paths:
        parts = p.split(".") if p else []
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _traced_into(gm: torch.fx.GraphModule) -> set[str]:
    """Module paths (local to ``gm``) whose forward is code in ``gm``'s graph."""
    return {n.meta.get("module_path", "") for n in gm.graph.nodes}


def _insertion_modules(unit: Unit, site: Site, position: str) -> set[str]:
    """The modules (paths local to the unit) whose forward holds the nodes a placement
    needs to see: the add (its branch and shortcut may come from whole calls), the last
    conv of the branch for ``mid``, every layer of a conv block."""
    nodes = {n.name: n for n in unit.gm.graph.nodes}
    named = {n.meta.get("qualname"): n for n in unit.gm.graph.nodes}
    picked = [nodes.get(site.node)]
    if site.kind == "residual-add" and position == "mid" and site.mid_conv is not None:
        picked.append(nodes.get(site.mid_conv))
    if site.kind == "conv-block":
        picked += [named.get(q) for q in site.layers]
    return {n.meta.get("module_path", "") for n in picked if n is not None}


def _retrace(model: nn.Module, parts: Partition, unit: Unit, into: set[str],
             input_size: tuple[int, int, int]) -> Unit:
    if not unit.path:
        gm = trace(model, parts.leaf_modules, into=into)
        return Unit("", gm, find_sites(gm, propagate_shapes(gm, input_size)))
    call = one_call(parts.calls or {}, unit.path)
    if call is None:
        raise TraceError(f"no recorded call of {unit.path!r}")
    return _trace_unit(model, unit.path, call, parts.leaf_modules, into)


def _slimmer(model: nn.Module, parts: Partition, unit: Unit, into: set[str],
             input_size: tuple[int, int, int]) -> tuple[Unit | None, dict[str, str]]:
    """``unit`` traced into ``into`` (paths local to it) and the modules whose code its
    caller needs, if it traces so; and why each module traced into is (a path -> why)."""
    why = {p: "holds an insertion point" for p in into}
    if _traced_into(unit.gm) <= into:
        return None, why
    root = model.get_submodule(unit.path)
    for _ in range(_MAX_RETRACES):
        try:
            return _retrace(model, parts, unit, into, input_size), why
        except TraceError as e:
            holder = e.module or ""
            try:
                children = {_join(holder, c) for c, _ in root.get_submodule(holder).named_children()}
            except AttributeError:  # not a module of this unit: nothing more to trace into
                children = set()
            if not children - into:
                return None, why
            for c in children - into:
                why[c] = f"{holder or 'the forward'} needs its result as Python values ({e.reason or e})"
            into = into | children
    return None, why


def slim(model: nn.Module, parts: Partition, placements: Sequence[tuple[Site, str]],
         input_size: tuple[int, int, int]) -> tuple[Partition, tuple[tuple[str, str], ...]]:
    """Trace each unit that receives attention again, into the modules that hold an
    insertion point only: every other module stays a called submodule with its own class
    and forward, so code that swaps a module's forward or deletes its layers (Ultralytics'
    ``fuse()``, hooks) keeps working on the result. Reads only; the rewrite changes things.

    A module whose caller needs its result as Python values (``a, b = self.block(x)``)
    cannot stay a call; it is traced into, and said so. A unit whose slimmer trace does
    not give the same sites keeps its first trace.

    Args:
        model: the model the partition was made of.
        parts: the partition, narrowed by :func:`refine`.
        placements: ``(site, position)`` of every placement, sites in the model's namespace.
        input_size: ``(C, H, W)`` the partition was analysed at.

    Returns:
        The partition with slimmer units (``origin`` pointing at their sites), and
        ``(module path, why its forward is graph code)`` for every module traced into.
    """
    need: dict[str, set[str]] = {}
    placed: dict[str, set[SiteRef]] = {}
    mids: set[SiteRef] = set()
    for site, position in placements:
        local = parts.origin[site.ref]
        need.setdefault(local.unit, set()).update(_insertion_modules(parts.units[local.unit], local, position))
        placed.setdefault(local.unit, set()).add(site.ref)
        if position == "mid":
            mids.add(site.ref)
    units = dict(parts.units)
    origin = dict(parts.origin)
    inlined: list[tuple[str, str]] = []
    for path in [p for p in parts.units if p in need]:
        new, why = _slimmer(model, parts, units[path], _closure(need[path]), input_size)
        if new is not None:
            same = {_same(s): s for s in new.analysis.sites}
            moved = {ref: same.get(_same(origin[ref])) for ref in placed[path]}
            # a slimmer trace that calls the branch's convolutions whole loses their middle
            if all(s is not None and (ref not in mids or s.mid_conv is not None) for ref, s in moved.items()):
                units[path] = new
                # Sites nobody selected in this unit are gone from its slimmer graph.
                origin = {r: s for r, s in origin.items() if s.unit != path}
                origin.update({r: s for r, s in moved.items() if s is not None})
        inlined += [(_join(path, p), why.get(p, "its caller's trace needs its code (no slimmer trace gave the same "
                                                "sites)")) for p in sorted(_traced_into(units[path].gm) - {""})]
    return replace(parts, units=units, origin=origin), tuple(inlined)
