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
recorded for it. A unit whose own trace does not give the same sites moves up to its
parent. Sites of all units are planned together, with paths and stages in the model's own
namespace, so rules read exactly as for a whole-model rewrite.

Analysis here reads only; :mod:`retrofit.rewrite` still does every change.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .errors import TraceError, first_line
from .meta import original_class
from .modes import eval_mode, plain_attributes_kept
from .shapes import TensorInfo, propagate_shapes
from .sites import Site, SiteAnalysis, SkippedCandidate, find_sites, holds_conv, number_stages
from .trace import LeafSpec, RetrofitTracer, flattens_inputs, optional_defaults, relative_leaves, trace
from .verify import input_dtype_device

__all__ = ["Unit", "Partition", "Flow", "partition", "refine", "slim", "record_inputs", "probe"]

# One recorded call: positional and keyword inputs, tensors as TensorInfo.
Call = tuple[tuple[Any, ...], dict[str, Any]]
_MAX_OPAQUE = 64  # submodules a unit may call whole because they do not trace


@dataclass(frozen=True)
class Unit:
    """A module that traced: its graph, and its sites in its own namespace."""

    path: str  # module path in the model; "" is the root (the whole model traced)
    gm: torch.fx.GraphModule  # the traced module (shares the model's submodules)
    analysis: SiteAnalysis  # sites with paths relative to the unit
    opaque: tuple[str, ...] = ()  # submodules (paths relative to it) called whole: their own forward does not trace


@dataclass(frozen=True)
class Partition:
    """The model split into traced units and code left as it is."""

    units: tuple[Unit, ...]  # traced modules, in module-tree order; (root,) when the model traced whole
    left_alone: tuple[tuple[str, str], ...]  # (module path, why it was not traced); "" is the top level
    analysis: SiteAnalysis  # every unit's sites, paths in the model's namespace, stages over the model
    origin: dict[str, tuple[int, Site]]  # site node (in `analysis`) -> (unit index, unit-local site)
    notes: tuple[str, ...] = ()  # tracer notes of the units (train/eval-dependent code)
    root_error: TraceError | None = None  # why the model's own forward did not trace, if it did not
    whole_analysis: SiteAnalysis | None = None  # keep_class: the whole model's sites, out-of-reach ones included
    calls: dict[str, list[Call]] | None = None  # inputs each submodule got in the probe forward (not whole)
    leaf_modules: tuple[LeafSpec, ...] = ()  # what the units were traced with

    @property
    def whole(self) -> bool:
        """The model traced as a whole: one root unit, rewritten into a GraphModule."""
        return self.calls is None

    def local(self, site: Site) -> tuple[Unit, Site]:
        """The unit holding ``site`` and the site in that unit's namespace (stage kept)."""
        index, orig = self.origin[site.node]
        return self.units[index], replace(orig, stage=site.stage, block=site.block)


def _info(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype, value.device)
    return value


@dataclass
class Flow:
    """Which tensors each module took and returned in a probe forward, by object identity
    (the tensors are kept alive, so identities stay unique)."""

    inputs: dict[str, list[set[tuple[int, int]]]]  # module path -> per call, (id, version) of its tensor inputs
    outputs: dict[str, list[set[tuple[int, int]]]]  # module path -> per call, (id, version) of its tensor outputs
    keep: list[Any]  # the tensors themselves


def _ids(value: Any, keep: list[Any]) -> set[tuple[int, int]]:
    """The tensors in ``value`` as (identity, version): an in-place op (``x += shortcut``,
    ``relu_``) keeps the object and bumps its version, and makes another value."""
    tensors = [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
    keep += tensors
    return {(id(t), t._version) for t in tensors}


@contextlib.contextmanager
def _recording(model: nn.Module) -> Iterator[tuple[dict[str, list[Call]], Flow]]:
    calls: dict[str, list[Call]] = {}
    flow = Flow({}, {}, [])
    handles = []

    def hook(path: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def record(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.setdefault(path, []).append(
                (tuple(pytree.tree_map(_info, list(args))), dict(pytree.tree_map(_info, dict(kwargs))))
            )
            flow.inputs.setdefault(path, []).append(_ids((args, kwargs), flow.keep))

        return record

    def after(path: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(_mod: nn.Module, _args: Any, out: Any) -> None:
            flow.outputs.setdefault(path, []).append(_ids(out, flow.keep))

        return record

    for path, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(hook(path), with_kwargs=True))
        handles.append(mod.register_forward_hook(after(path)))
    try:
        yield calls, flow
    finally:
        for h in handles:
            h.remove()


def record_inputs(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 2) -> dict[str, list[Call]]:
    """The inputs every submodule receives in one forward of a ``(batch, *input_size)`` probe
    (see :func:`probe`)."""
    return probe(model, input_size, batch_size)[0]


@contextlib.contextmanager
def _fake_tensor_log_off() -> Iterator[None]:
    """FakeTensorMode logs a traceback for every kernel that raises; a fake probe that fails
    is run for real (or says what to fix), so on the user's terminal those lines are noise."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    disabled, log.disabled = log.disabled, True
    try:
        yield
    finally:
        log.disabled = disabled


def probe(model: nn.Module, input_size: tuple[int, int, int],
          batch_size: int = 2) -> tuple[dict[str, list[Call]], Flow]:
    """The inputs every submodule receives in one forward of a ``(batch, *input_size)`` probe,
    and which tensors each module took and returned.

    The probe runs on fake tensors (nothing computed, nothing of the model written); a
    forward whose control flow needs real values runs once for real on zeros, in eval mode
    without gradients. Every submodule's train/eval mode is restored afterwards.

    Raises:
        TraceError: the model does not run on the probe input.
    """
    dtype, device = input_dtype_device(model)
    shape = (batch_size, *input_size)
    with eval_mode(model), torch.no_grad(), plain_attributes_kept(model):
        try:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            state: dict[str, torch.Tensor] = {
                n: mode.from_tensor(t) for n, t in [*model.named_parameters(), *model.named_buffers()]
            }
            with _recording(model) as (calls, flow), mode, _fake_tensor_log_off():
                torch.func.functional_call(model, state, (torch.empty(shape, dtype=dtype, device=device),),
                                           tie_weights=False, strict=False)
            return calls, flow
        except Exception:  # control flow that reads values: run it for real below
            pass
        try:
            with _recording(model) as (calls, flow):
                model(torch.zeros(shape, dtype=dtype, device=device))
            return calls, flow
        except Exception as e:
            reason = first_line(e)
            raise TraceError(
                f"{type(model).__name__} does not run on a {tuple(shape)} probe input ({reason}); "
                "pass an input_size it runs on (a multiple of its largest stride, as 64 for a P6 YOLO)"
            ) from e


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


def _prefixed(site: Site, prefix: str, index: int) -> Site:
    return replace(
        site,
        path=_join(prefix, site.path),
        module_path=_join(prefix, site.module_path),
        qualname=_join(prefix, site.qualname),
        layers=tuple(_join(prefix, q) for q in site.layers),
        node=f"{index}:{site.node}",
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


def _key(site: Site, prefix: str) -> tuple[str, str, int, tuple[int, int]]:
    """What identifies a site across traces of nested modules: its kind, its node's
    qualified name in the model, its channels and size (torch.fx names nodes the same way
    whichever module the trace starts from)."""
    return site.kind, _join(prefix, site.qualname), site.channels, site.size


def _one_call(path: str, calls: dict[str, list[Call]]) -> Call | None:
    """The inputs a module was called with, if it was called, and always with the same ones."""
    recorded = calls.get(path, [])
    return recorded[0] if recorded and all(c == recorded[0] for c in recorded[1:]) else None


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
    for _ in range(_MAX_OPAQUE):
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
        raise TraceError(f"{type(mod).__name__} at {path!r}: more than {_MAX_OPAQUE} submodules do not trace")
    analysis = find_sites(gm, propagate_shapes(gm, None, inputs=_placeholder_inputs(gm, mod, call)))
    return Unit(path, gm, analysis, tuple(opaque))


def _largest_units(model: nn.Module, calls: dict[str, list[Call]], leaf_modules: Sequence[LeafSpec],
                   root_reason: str) -> tuple[list[Unit], list[tuple[str, str]]]:
    """From the top down, each submodule that traces is a unit; one that does not is left
    as Python code while its children are tried. The root is never one."""
    tracer = RetrofitTracer(leaf_modules)
    units: list[Unit] = []
    left: list[tuple[str, str]] = []

    def visit(mod: nn.Module, path: str) -> None:
        if path and not holds_conv(mod):
            return  # no convolution, no site
        # torch.fx counts ModuleList and ModuleDict as built-in leaves; they are never
        # called, and the modules in them are the ones to reach.
        if path and not isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and tracer.is_leaf_module(mod, path):
            # Built-in layers hold no sites of their own; other leaves are opaque by request.
            if not type(mod).__module__.startswith("torch.nn"):
                left.append((path, f"leaf module ({type(mod).__name__}); not traced into"))
            return
        recorded = calls.get(path, [])
        if not path:
            left.append(("", root_reason))
        elif not recorded:
            # A container the forward iterates (an nn.Sequential or ModuleList run in a
            # Python loop, as YOLO's and ConvNeXt's stages are) is never called itself; the
            # modules in it are.
            if not any(calls.get(_join(path, sub)) for sub, _ in mod.named_modules() if sub):
                if holds_conv(mod):
                    left.append((path, "not called on the probe input"))
                return
        elif (call := _one_call(path, calls)) is None:
            left.append((path, f"called {len(recorded)} times with different inputs; its children are tried"))
        else:
            try:
                unit = _trace_unit(model, path, call, leaf_modules)
            except TraceError as e:
                left.append((path, first_line(e)))
            else:
                units.append(unit)
                for sub in unit.opaque:  # called whole by the unit; what is inside may trace alone
                    visit(model.get_submodule(_join(path, sub)), _join(path, sub))
                return
        for name, child in mod.named_children():
            visit(child, _join(path, name))

    visit(model, "")
    return units, left


def _refine(model: nn.Module, coarse: Unit, sites: Sequence[Site], calls: dict[str, list[Call]],
            leaf_modules: Sequence[LeafSpec], tried: dict[str, Unit | None]) -> tuple[list[tuple[Site, Unit, Site]],
                                                                                   list[Site]]:
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
        ``(coarse-local site, unit, unit-local site)`` per site in the coarse unit's graph
        order, and the coarse-local sites out of reach.
    """
    top = coarse.path
    at: dict[str, str] = {s.node: _join(top, _anchor(s, coarse.gm)) for s in sites}
    out_of_reach: set[str] = set()
    while True:
        live = {n: a for n, a in at.items() if n not in out_of_reach}
        for a in sorted(set(live.values())):
            if a != top and a not in tried:
                call = _one_call(a, calls)
                try:
                    tried[a] = None if call is None else _trace_unit(model, a, call, leaf_modules)
                except TraceError:
                    tried[a] = None
        # The root's forward is never a unit; below it, a traced anchor inside another
        # traced anchor is part of it.
        traced = {a for a in live.values() if a == top or tried[a] is not None} - {""}
        for n, a in live.items():
            outer = [b for b in traced if b != a and _within(a, b)]
            if outer:
                at[n] = min(outer, key=len)  # the outermost: it holds the others
        found = {a: {_key(x, a) for x in u.analysis.sites} for a in traced if a != top and (u := tried[a]) is not None}
        changed = False
        for s in sites:
            if s.node in out_of_reach:
                continue
            a = at[s.node]
            if a == top:
                if top == "":
                    out_of_reach.add(s.node)
                continue
            if a not in found or _key(s, top) not in found[a]:
                at[s.node] = _parent(a) if _within(_parent(a), top) else top
                changed = True
        if not changed:
            break
    placed: list[tuple[Site, Unit, Site]] = []
    for s in sites:
        if s.node in out_of_reach:
            continue
        a = at[s.node]
        if a == top:
            placed.append((s, coarse, s))
        else:
            unit = tried[a]
            assert unit is not None  # only anchors that traced and gave the site keep it
            local = next(x for x in unit.analysis.sites if _key(x, a) == _key(s, top))
            placed.append((s, unit, local))
    return placed, [s for s in sites if s.node in out_of_reach]


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
    root: Unit | None = None
    root_error: TraceError | None = None
    gm: torch.fx.GraphModule | None = None
    try:
        gm = trace(model, leaf_modules)
        root = Unit("", gm, find_sites(gm, propagate_shapes(gm, input_size)))
    except TraceError as e:
        root_error = e
    if root is not None and not keep_class:
        whole = Partition((root,), (), root.analysis, {s.node: (0, s) for s in root.analysis.sites},
                          tuple(root.gm.meta.get("retrofit_trace_notes", ())))
        return _with_flow(model, whole, probe(model, input_size)[1]) if flow else whole
    try:
        calls, flows = probe(model, input_size)
    except TraceError:
        if gm is not None and root_error is not None:
            raise root_error from None  # it traced, its shapes failed: the node named is what to fix
        raise  # it does not run on the input at all (whatever else stops its trace)
    if root is not None:
        left = [("", f"the forward of {type(model).__name__} stays Python code (keep_class)")]
        # Stages and blocks as in the whole-model rewrite: the root's own numbering.
        reachable = tuple(s for s in root.analysis.sites if _anchor(s, root.gm) != "")
        kept = Partition((root,), tuple(left), SiteAnalysis(reachable, root.analysis.skipped, tuple(left)),
                         {s.node: (0, s) for s in reachable}, (), None, root.analysis, calls, leaf_modules)
        return _with_flow(model, kept, flows) if flow else kept
    why = f"does not trace: {root_error.where}" if root_error is not None else "kept as Python code"
    units, left = _largest_units(model, calls, leaf_modules, why)
    sites: list[Site] = []
    skipped: list[SkippedCandidate] = []
    origin: dict[str, tuple[int, Site]] = {}
    for i, unit in enumerate(units):
        for s in unit.analysis.sites:
            p = _prefixed(s, unit.path, i)
            origin[p.node] = (i, s)
            sites.append(p)
        skipped += [replace(c, qualname=_join(unit.path, c.qualname)) for c in unit.analysis.skipped]
    notes = tuple(f"{u.path}: {n}" for u in units for n in u.gm.meta.get("retrofit_trace_notes", ()))
    parts = Partition(tuple(units), tuple(left), SiteAnalysis(number_stages(sites), tuple(skipped), tuple(left)),
                      origin, notes, root_error, None, calls, leaf_modules)
    return _with_flow(model, parts, flows) if flow else parts


def _returned(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return node in pytree.tree_leaves(output.args[0])


def _with_flow(model: nn.Module, parts: Partition, flow: Flow) -> Partition:
    """Each site's ``output_of`` / ``input_of``: the modules (``"path (Class)"``) that return
    its tensor or take it, found by the identity of the tensors of a probe forward. A site's
    tensor is known when its node calls a module called once (its output), or when it is
    what its unit returns."""
    classes: dict[str, str] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        classes.setdefault(path, original_class(mod).__name__)
    made_by: dict[tuple[int, int], list[str]] = {}
    taken_by: dict[tuple[int, int], list[str]] = {}
    for path, per_call in flow.outputs.items():
        for call_ids in per_call:
            for i in call_ids:
                made_by.setdefault(i, []).append(path)
    for path, per_call in flow.inputs.items():
        for call_ids in per_call:
            for i in call_ids:
                taken_by.setdefault(i, []).append(path)

    def named(paths: list[str]) -> tuple[str, ...]:
        return tuple(f"{p or '(top level)'} ({classes.get(p, '?')})" for p in dict.fromkeys(paths))

    sites: list[Site] = []
    origin = dict(parts.origin)
    for site in parts.analysis.sites:
        index, local = parts.origin[site.node]
        unit = parts.units[index]
        node = next((n for n in unit.gm.graph.nodes if n.name == local.node), None)
        ids: set[tuple[int, int]] = set()
        if node is not None and node.op == "call_module":
            calls = flow.outputs.get(_join(unit.path, str(node.target)), [])
            ids = calls[0] if len(calls) == 1 else set()
        if not ids and node is not None and _returned(unit.gm, node):
            calls = flow.outputs.get(unit.path, [])
            ids = calls[0] if len(calls) == 1 else set()
        made = named([p for i in ids for p in made_by.get(i, [])])
        taken = named([p for i in ids for p in taken_by.get(i, [])])
        sites.append(replace(site, output_of=made, input_of=taken))
        origin[site.node] = (index, replace(local, output_of=made, input_of=taken))
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
    if calls is None:  # parts.whole: one root unit, nothing to narrow
        return parts, ()
    by_unit: dict[int, list[Site]] = {}
    for site in sites:
        index, local = parts.origin[site.node]
        by_unit.setdefault(index, []).append(local)
    tried: dict[str, Unit | None] = {}
    placed: dict[tuple[int, str], tuple[Unit, Site]] = {}  # (coarse index, coarse-local node) -> fine
    lost: set[tuple[int, str]] = set()
    for index, local_sites in by_unit.items():
        fine, out = _refine(model, parts.units[index], local_sites, calls, parts.leaf_modules, tried)
        placed.update({(index, cs.node): (unit, ls) for cs, unit, ls in fine})
        lost.update((index, cs.node) for cs in out)
    tree = {name: i for i, (name, _) in enumerate(model.named_modules())}
    units = sorted({u.path: u for u, _ in placed.values()}.values(), key=lambda u: tree[u.path])
    number = {u.path: i for i, u in enumerate(units)}
    origin: dict[str, tuple[int, Site]] = {}
    unreachable: list[Site] = []
    for site in sites:
        index, local = parts.origin[site.node]
        if (index, local.node) in lost:
            unreachable.append(site)
        else:
            unit, ls = placed[(index, local.node)]
            origin[site.node] = (number[unit.path], ls)
    notes = tuple(f"{u.path}: {n}" for u in units for n in u.gm.meta.get("retrofit_trace_notes", ()))
    return replace(parts, units=tuple(units), origin=origin, notes=notes), tuple(unreachable)


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
    call = _one_call(unit.path, parts.calls or {})
    if call is None:
        raise TraceError(f"no recorded call of {unit.path!r}")
    return _trace_unit(model, unit.path, call, parts.leaf_modules, into)


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
    need: dict[int, set[str]] = {}
    placed: dict[int, set[str]] = {}
    for site, position in placements:
        index, local = parts.origin[site.node]
        need.setdefault(index, set()).update(_insertion_modules(parts.units[index], local, position))
        placed.setdefault(index, set()).add(site.node)
    units = list(parts.units)
    origin = dict(parts.origin)
    inlined: list[tuple[str, str]] = []
    for index, paths in sorted(need.items()):
        unit = units[index]
        into = _closure(paths)
        why = {p: "holds an insertion point" for p in into}
        if not _traced_into(unit.gm) <= into:
            root = model.get_submodule(unit.path)
            new: Unit | None = None
            for _ in range(256):
                try:
                    new = _retrace(model, parts, unit, into, input_size)
                    break
                except TraceError as e:
                    holder = e.module or ""
                    try:
                        children = {_join(holder, c) for c, _ in root.get_submodule(holder).named_children()}
                    except AttributeError:
                        children = set()
                    if not children - into:
                        break
                    for c in children - into:
                        why[c] = f"{holder or 'the forward'} needs its result as Python values ({e.reason or e})"
                    into |= children
            if new is not None:
                keys = {_key(s, ""): s for s in new.analysis.sites}
                moved = {n: keys.get(_key(origin[n][1], "")) for n in placed[index]}
                if all(s is not None for s in moved.values()):
                    units[index] = new
                    # Sites nobody selected in this unit are gone from its slimmer graph.
                    origin = {n: v for n, v in origin.items() if v[0] != index}
                    origin.update({n: (index, s) for n, s in moved.items() if s is not None})
                    unit = new
        for p in sorted(_traced_into(unit.gm) - {""}):
            inlined.append((_join(unit.path, p), why.get(p, "its caller's trace needs its code (no slimmer trace "
                                                            "gave the same sites)")))
    return replace(parts, units=tuple(units), origin=origin), tuple(inlined)
