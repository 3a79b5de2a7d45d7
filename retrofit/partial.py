"""Partial tracing: retrofit inside a model's own module tree, one traced submodule at a time.

Two cases take this path. A model whose forward torch.fx cannot follow as a whole
(data-dependent Python control flow, a ``.item()`` in a branch) still has submodules that
trace; and a user may want the result to stay an instance of the model's class (its
``forward_features``, ``reset_classifier``, ``get_classifier`` and friends), which a
``GraphModule`` is not.

Both are served the same way: a probe forward records the inputs every submodule sees;
starting from the top, each submodule that traces becomes a *unit* (the largest traceable
pieces), and each one that does not is left as Python code while its children are tried
in turn. Sites of all units are planned together, with paths in the model's own namespace,
so rules read exactly as for a whole-model rewrite. Units that receive attention are
replaced, in place, by their rewritten ``GraphModule``; everything else in the tree is the
model's own module object.

Analysis here reads only; :mod:`retrofit.rewrite` still does every graph change.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .errors import TraceError, first_line
from .shapes import TensorInfo, propagate_shapes
from .sites import Site, SiteAnalysis, SkippedCandidate, find_sites, holds_conv, number_stages
from .trace import LeafSpec, RetrofitTracer, optional_defaults, trace
from .verify import eval_mode, input_dtype_device

__all__ = ["Unit", "Partition", "partition", "record_inputs"]

# One recorded call: positional and keyword inputs, tensors as TensorInfo.
Call = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class Unit:
    """A submodule that traced: its graph, and its sites in its own namespace."""

    path: str  # module path in the model ("layer1"); never "" (the top level is not a unit)
    gm: torch.fx.GraphModule  # the traced submodule (shares the model's submodules)
    analysis: SiteAnalysis  # sites with paths relative to the unit


@dataclass(frozen=True)
class Partition:
    """The model split into traced units and code left as it is."""

    units: tuple[Unit, ...]  # traced submodules, in module-tree order
    left_alone: tuple[tuple[str, str], ...]  # (module path, why it was not traced)
    analysis: SiteAnalysis  # every unit's sites, paths in the model's namespace, stages over all
    origin: dict[str, tuple[int, Site]]  # prefixed site node -> (unit index, unit-local site)
    notes: tuple[str, ...] = ()  # tracer notes of the units (train/eval-dependent code)

    def local(self, site: Site) -> tuple[Unit, Site]:
        """The unit holding ``site`` and the site in that unit's namespace (stage kept)."""
        index, orig = self.origin[site.node]
        return self.units[index], replace(orig, stage=site.stage, block=site.block)


def _info(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype, value.device)
    return value


@contextlib.contextmanager
def _recording(model: nn.Module) -> Iterator[dict[str, list[Call]]]:
    calls: dict[str, list[Call]] = {}
    handles = []

    def hook(path: str):  # type: ignore[no-untyped-def]
        def record(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.setdefault(path, []).append(
                (tuple(pytree.tree_map(_info, list(args))), dict(pytree.tree_map(_info, dict(kwargs))))
            )

        return record

    for path, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(hook(path), with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def record_inputs(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 2) -> dict[str, list[Call]]:
    """The inputs every submodule receives in one forward of a ``(batch, *input_size)`` probe.

    The probe runs on fake tensors (nothing computed, nothing of the model written); a
    forward whose control flow needs real values runs once for real on zeros, in eval mode
    without gradients. Every submodule's train/eval mode is restored afterwards.

    Raises:
        TraceError: the model does not run on the probe input.
    """
    dtype, device = input_dtype_device(model)
    shape = (batch_size, *input_size)
    with eval_mode(model), torch.no_grad():
        try:
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            state = {n: mode.from_tensor(t) for n, t in [*model.named_parameters(), *model.named_buffers()]}
            with _recording(model) as calls, mode:
                torch.func.functional_call(model, state, (torch.empty(shape, dtype=dtype, device=device),),
                                           tie_weights=False, strict=False)
            return calls
        except Exception:  # control flow that reads values: run it for real below
            pass
        try:
            with _recording(model) as calls:
                model(torch.zeros(shape, dtype=dtype, device=device))
            return calls
        except Exception as e:
            reason = first_line(e)
            raise TraceError(
                f"{type(model).__name__} does not run on a {tuple(shape)} probe input ({reason}); "
                "check input_size"
            ) from e


def _placeholder_inputs(gm: torch.fx.GraphModule, call: Call) -> tuple[Any, ...]:
    """One value per placeholder of ``gm``, from a recorded call (positional, keyword, default)."""
    args, kwargs = call
    values: list[Any] = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        name = str(node.target).lstrip("*")
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        elif node.args:
            values.append(node.args[0])
        else:
            raise TraceError(f"no recorded value for input {name!r}")
    return tuple(values)


def _concrete(mod: nn.Module, call: Call) -> dict[str, bool | None]:
    """Optional inputs the model passes as None or a bool (or not at all) keep that value
    while tracing; the generated forward asserts they keep it."""
    try:
        bound = inspect.signature(mod.forward).bind_partial(*call[0], **call[1]).arguments
    except TypeError:
        return {}
    out: dict[str, bool | None] = {}
    for k, default in optional_defaults(mod).items():
        value = bound.get(k, default)
        if value is None or type(value) is bool:
            out[k] = value
    return out


def _relative_leaves(leaves: Sequence[LeafSpec], path: str) -> tuple[LeafSpec, ...]:
    """Leaf specs for tracing the submodule at ``path``: module paths become relative to it."""
    out: list[LeafSpec] = list(leaves)
    out += [s[len(path) + 1:] for s in leaves if isinstance(s, str) and path and s.startswith(path + ".")]
    return tuple(out)


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


def partition(
    model: nn.Module,
    input_size: tuple[int, int, int],
    leaf_modules: Sequence[LeafSpec] = (),
    root_reason: str = "kept as Python code",
) -> Partition:
    """Split ``model`` below its top level into the largest traceable submodules; analyse each.

    The model's own forward is never traced (the caller knows why: it does not trace, or
    the model's class must stay); ``root_reason`` is recorded for it.

    Args:
        model: the model (not modified).
        input_size: ``(C, H, W)`` of the probe that records each submodule's inputs.
        leaf_modules: modules not to trace into (classes, class names, module paths).
        root_reason: why the top-level forward is left alone, for the report.

    Returns:
        The units, the submodules left alone with the reason, and all sites.

    Raises:
        TraceError: the model does not run on the probe input.
    """
    calls = record_inputs(model, input_size)
    tracer = RetrofitTracer(leaf_modules)
    units: list[Unit] = []
    left: list[tuple[str, str]] = []
    notes: list[str] = []

    def visit(mod: nn.Module, path: str) -> None:
        if path and tracer.is_leaf_module(mod, path):
            # Built-in layers hold no sites of their own; other leaves are opaque by request.
            if not type(mod).__module__.startswith("torch.nn") and holds_conv(mod):
                left.append((path, f"leaf module ({type(mod).__name__}); not traced into"))
            return
        recorded = calls.get(path, [])
        if not path:
            left.append(("", root_reason))
        elif not recorded:
            if holds_conv(mod):
                left.append((path, "not called on the probe input"))
            return
        elif any(c != recorded[0] for c in recorded[1:]):
            left.append((path, f"called {len(recorded)} times with different inputs; its children are tried"))
        else:
            try:
                gm = trace(mod, _relative_leaves(leaf_modules, path), _concrete(mod, recorded[0]))
                analysis = find_sites(gm, propagate_shapes(gm, None, inputs=_placeholder_inputs(gm, recorded[0])))
            except TraceError as e:
                left.append((path, first_line(e)))
            else:
                units.append(Unit(path, gm, analysis))
                notes.extend(f"{path}: {n}" for n in gm.meta.get("retrofit_trace_notes", ()))
                return
        for name, child in mod.named_children():
            visit(child, _join(path, name))

    visit(model, "")
    sites: list[Site] = []
    skipped: list[SkippedCandidate] = []
    origin: dict[str, tuple[int, Site]] = {}
    for i, unit in enumerate(units):
        for s in unit.analysis.sites:
            p = _prefixed(s, unit.path, i)
            origin[p.node] = (i, s)
            sites.append(p)
        skipped += [replace(c, qualname=_join(unit.path, c.qualname)) for c in unit.analysis.skipped]
    return Partition(tuple(units), tuple(left), SiteAnalysis(number_stages(sites), tuple(skipped)), origin,
                     tuple(notes))

