"""Tracing a model into a torch.fx graph whose nodes carry readable module paths.

The tracer honours the no-trace registrations of the libraries users' models come from:
timm's leaf modules and autowrapped functions (``timm.layers.register_notrace_module`` /
``register_notrace_function``) and torchvision's ops, plus leaf modules the caller names.
Each node records the module whose ``forward`` holds it (``node.meta["module_path"]``) and
a readable name like torchvision's feature extraction uses (``node.meta["qualname"]``,
e.g. ``layer1.0.iadd``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import operator
import os
import re
import traceback
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from .attention import registered_types
from .errors import TraceError, first_line
from .fuse import gated_residual
from .meta import META_ATTR, ORIGINAL_CLASS_KEY, original_class
from .modes import train_mode
from .options import LeafSpec

__all__ = ["RetrofitTracer", "trace", "LeafSpec", "relative_leaves"]


# With the separator: torchvision's folder starts with torch's name too, and its frames are
# the model's code.
_TORCH_DIR = str(Path(torch.__file__).parent) + os.sep
_COUNTER_SUFFIX = re.compile(r"_\d+$")


def _timm_notrace() -> tuple[tuple[type[nn.Module], ...], tuple[Callable[..., Any], ...]]:
    import timm.models  # noqa: F401  (model modules register their leaves on import)
    from timm.layers import get_notrace_functions, get_notrace_modules

    fns = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), fns


def _torchvision_leaves() -> tuple[type[nn.Module], ...]:
    """torchvision.ops modules that torchvision's own feature extraction keeps opaque.

    The building blocks of classification models (``Conv2dNormActivation``,
    ``SqueezeExcitation``, ``StochasticDepth``, ...) trace cleanly and hold exactly the
    convolutions and residuals we look for, so we trace through those.
    """
    import torchvision.ops
    import torchvision.ops.misc
    import torchvision.ops.stochastic_depth

    transparent = {
        obj
        for mod in (torchvision.ops.misc, torchvision.ops.stochastic_depth)
        for obj in vars(mod).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module)
    }
    # StochasticDepth reads self.training: as a leaf it keeps switching with train/eval.
    transparent.discard(torchvision.ops.StochasticDepth)
    return tuple(
        obj
        for obj in vars(torchvision.ops).values()
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj not in transparent
    )


def _mode_dependent_leaves() -> tuple[type[nn.Module], ...]:
    """timm layers whose forward reads ``self.training``: leaves keep them switchable."""
    from timm.layers import DropBlock2d, DropPath

    return (DropPath, DropBlock2d)


class RetrofitTracer(torch.fx.Tracer):
    """A tracer with timm's and torchvision's leaf registrations and qualified node names.

    Args:
        leaf_modules: extra modules not to trace into: classes, class names, or module
            paths of ``root``. Attention is never inserted inside a leaf module.
        into: when given, the only module paths of ``root`` to trace into; every other
            module is called as a leaf (kept with its class and forward). The rewrite
            traces this way so that modules holding no insertion point stay intact.
    """

    def __init__(self, leaf_modules: Sequence[LeafSpec] = (), into: Collection[str] | None = None) -> None:
        import torchvision.ops

        timm_leaves, timm_fns = _timm_notrace()
        # A retrofitted model traced again keeps its fused residual adds as single nodes.
        # torch annotates autowrap_modules as a 1-tuple, tuple[ModuleType]; it takes any number.
        super().__init__(autowrap_modules=(math, torchvision.ops),  # type: ignore[arg-type]
                         autowrap_functions=(*timm_fns, gated_residual))
        self._leaf_types = timm_leaves + _torchvision_leaves() + _mode_dependent_leaves() + registered_types()
        self._user_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self._user_names = {m for m in leaf_modules if isinstance(m, str)}
        self._into = None if into is None else frozenset(into)
        self._module_path = ""
        self._name_counts: dict[str, int] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._user_names or type(m).__name__ in self._user_names:
            return True
        if self._into is not None and module_qualified_name not in self._into:
            return True
        if isinstance(m, self._user_types) or isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        outer = self._module_path
        # A leaf's node belongs to its caller; a traced-through module's ops belong to it.
        if not self.is_leaf_module(m, path):
            self._module_path = path
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            # The innermost module sees the failure first; keep its name for the message.
            if not hasattr(e, "_retrofit_module"):
                try:
                    e._retrofit_module = (path, type(m).__name__)  # type: ignore[attr-defined]
                except AttributeError:  # an exception type that takes no attributes: the message names the model
                    pass
            raise
        finally:
            self._module_path = outer

    def create_arg(self, a: Any) -> Any:
        # A dict that is also a dataclass (transformers' ModelOutput) is built again as its
        # class: torch.fx makes every dict a plain one, and the caller that reads
        # `outputs.pooler_output` of a traced module would break.
        if isinstance(a, dict) and type(a) is not dict and dataclasses.is_dataclass(a):
            return self.create_node("call_function", type(a), (), {k: self.create_arg(v) for k, v in a.items()})
        return super().create_arg(a)

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                    type_expr: Any | None = None) -> torch.fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["module_path"] = self._module_path
        node.meta["qualname"] = self._qualname(node)
        return node

    def _qualname(self, node: torch.fx.Node) -> str:
        if node.op in ("call_module", "get_attr"):
            return str(node.target)
        if node.op in ("placeholder", "output"):
            return node.name
        base = _COUNTER_SUFFIX.sub("", node.name)
        name = f"{self._module_path}.{base}" if self._module_path else base
        count = self._name_counts.get(name, 0)
        self._name_counts[name] = count + 1
        return f"{name}_{count}" if count else name


class RetrofitGraphModule(torch.fx.GraphModule):
    """torch.fx's GraphModule, for a traced model: it keeps the model's containers
    indexable (``gm.layer4[-1]``), and a method of the model's class that it does not have
    (``get_classifier``) fails with an error that says what the object is and how to keep
    the class."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # In `meta`, which copy.deepcopy keeps (it rebuilds the class).
            original = self.__dict__.get("meta", {}).get(ORIGINAL_CLASS_KEY)
            if original is None or name.startswith("_") or not hasattr(original, name):
                raise
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r}: it is the torch.fx.GraphModule made by "
                f"tracing {original.__module__}.{original.__qualname__}, with its submodules and forward but not its "
                "methods; retrofit(..., keep_class=True) (CLI: --keep-class) keeps the model's class and every method"
            ) from None


class TracedSequential(nn.Sequential):
    """An ``nn.Sequential`` of a traced model's GraphModule: it indexes, slices and iterates as
    the original did, but is never called (the graph calls its layers), so it has no forward
    of its own (which would make TorchScript compile a call of every child)."""

    forward = nn.Module.forward


def _restore_containers(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Give ``gm``'s containers the classes they have in ``model`` (torch.fx rebuilds them as
    plain Modules), in the model's child order, so ``gm.layer4[-1]`` indexes as the model
    does. Only containers whose every child torch.fx kept."""
    for path, orig in model.named_modules():
        if not path or type(orig) not in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
            continue
        try:
            mine = gm.get_submodule(path)
        except AttributeError:
            continue
        if type(mine) is not nn.Module or not set(orig._modules) <= set(mine._modules):
            continue
        ordered = {k: mine._modules[k] for k in orig._modules}
        ordered.update((k, v) for k, v in mine._modules.items() if k not in ordered)
        mine._modules.clear()
        mine._modules.update(ordered)
        mine.__class__ = TracedSequential if type(orig) is nn.Sequential else type(orig)


def _fx_reason(e: BaseException) -> str:
    """torch.fx's message without the advice that follows its first sentence (it points to
    its own docs; the hint retrofit adds says what to do)."""
    line = first_line(e)
    if type(e).__module__.startswith("torch") or "Proxy" in line or "symbolically traced" in line:
        line = re.split(r"(?<=[.:])\s+(?=This |See |Check )", line, maxsplit=1)[0].rstrip(".:")
    return line


def _failure_frame(e: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame outside torch: where tracing broke in the model's code."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    return frames[-1] if frames else None


def optional_defaults(model: nn.Module) -> dict[str, bool | None]:
    """The forward's optional inputs that default to None or a bool (``mask=None``,
    ``is_causal=False``), past the first, with their defaults.

    Traced as proxies they would take the ``if mask is not None:`` branch or fail at
    ``if is_causal:``; a model is called with its input alone, so they are traced as the
    defaults they have then (torch.fx's generated forward asserts they keep them).
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params[1:]
            if (p.default is None or type(p.default) is bool)
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def flattens_inputs(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm``'s generated forward flattens structured inputs into its placeholders
    (an input traced as a tuple of placeholders): it reads ``self._in_spec`` and
    ``self._out_spec``, which a class carrying that forward must provide."""
    return isinstance(gm.graph._codegen, torch.fx.graph._PyTreeCodeGen)


def trace(
    model: nn.Module, leaf_modules: Iterable[LeafSpec] = (), concrete_args: dict[str, Any] | None = None,
    into: Collection[str] | None = None,
) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares ``model``'s submodules and tensors.

    Args:
        model: the model to trace.
        leaf_modules: modules not to trace into (classes, class names or module paths).
        concrete_args: forward inputs fixed to a value while tracing (torch.fx's
            ``concrete_args``); default: the optional inputs that default to None
            and bool (:func:`optional_defaults`).
        into: when given, the only module paths to trace into (``""``, the model's own
            forward, is always traced); every other module stays a called submodule.

    Returns:
        A GraphModule named after the model's class; every node has ``meta["module_path"]``
        and ``meta["qualname"]``.

    Raises:
        TraceError: torch.fx could not trace the model; the message names the module and
            the source line where tracing broke and suggests making it a leaf module.
    """
    leaves = tuple(leaf_modules)
    if isinstance(model, torch.fx.GraphModule) and all("module_path" in n.meta for n in model.graph.nodes):
        # A model retrofit already traced (e.g. retrofitted once): its graph still knows
        # every node's module path, which a re-trace of the generated forward would lose.
        # The submodules it calls whole (they held no site then) are traced into now.
        graph = copy.deepcopy(model.graph)
        return _graph_module(model, graph, _inline_calls(model, graph, leaves, into))
    concrete = optional_defaults(model) if concrete_args is None else concrete_args
    graph = _trace_graph(model, leaves, concrete, into)
    notes: list[str] = []
    # Python code that reads `self.training` (F.dropout(training=self.training), drop-path
    # outside a module) is frozen into the graph in the mode it was traced in. If the two
    # modes trace differently, keep the eval-mode graph: exact at inference, always.
    with train_mode(model, not model.training):
        other = _trace_graph(model, leaves, concrete, into)
    if _signature(graph) != _signature(other):
        changed = sorted({n.meta.get("qualname", n.name) for n in _differing(graph, other)})
        if model.training:
            graph = other
        notes.append(
            "the forward depends on train/eval mode outside leaf modules "
            f"({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}); the graph keeps the eval-mode "
            "behaviour (exact at inference; those ops stay as in eval when training). Make the modules "
            "holding them leaf modules to keep them switchable"
        )
    return _graph_module(model, graph, notes)


def _graph_module(model: nn.Module, graph: torch.fx.Graph, notes: list[str]) -> torch.fx.GraphModule:
    gm = RetrofitGraphModule(model, graph, type(model).__name__)
    # The class the model was built with (a GraphModule or a block retrofitted before
    # knows it), for the error a missing method of that class gets.
    gm.meta[ORIGINAL_CLASS_KEY] = original_class(model)
    gm.meta["retrofit_trace_notes"] = notes
    _carry_unused_state(model, gm)
    _carry_metadata(model, gm)
    _restore_containers(model, gm)
    return gm


def _trace_graph(model: nn.Module, leaves: tuple[LeafSpec, ...], concrete: dict[str, Any],
                 into: Collection[str] | None = None) -> torch.fx.Graph:
    tracer = RetrofitTracer(leaves, into)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:
        path, cls = getattr(e, "_retrofit_module", ("", type(model).__name__))
        frame = _failure_frame(e)
        error = TraceError("", model=type(model).__name__, module=path, module_class=cls,
                           file=frame.filename if frame else None, line=frame.lineno if frame else None,
                           code=(frame.line or "").strip() or None if frame else None, reason=_fx_reason(e))
        if path:
            hint = (f"keep that module opaque with leaf_modules=[{cls!r}] (CLI: --leaf-module {cls}); no attention "
                    "is inserted inside it")
        else:  # the traced module's own forward: it cannot be its own leaf
            hint = (f"the model's own forward cannot be a leaf, so retrofit traces the submodules of {cls} instead; a "
                    f"site written in {cls}.forward itself is reachable only if that code moves into a submodule or "
                    "stops branching on tensor values")
        error.args = (f"{error.where}. torch.fx cannot follow data-dependent Python control flow; {hint}",)
        raise error from e
    # torch.fx names a fixed input's placeholder `mask_1`; give the generated forward the
    # model's own keyword (`gm(x, mask=None)`), as callers write it.
    taken = {n.target for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        if node.op == "placeholder" and isinstance(node.target, str) and node.target.endswith("_1"):
            name = node.target[:-2]
            if name in concrete and name not in taken:
                node.target = name
                taken.add(name)
    return graph


def relative_leaves(leaves: Sequence[LeafSpec], path: str) -> tuple[LeafSpec, ...]:
    """Leaf specs for tracing the submodule at ``path``: module paths under it made relative."""
    out: list[LeafSpec] = list(leaves)
    out += [s[len(path) + 1:] for s in leaves if isinstance(s, str) and path and s.startswith(path + ".")]
    return tuple(out)


def _has_attr(mod: nn.Module, path: str) -> bool:
    obj: Any = mod
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _prefix(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _inline_calls(root: nn.Module, graph: torch.fx.Graph, leaves: tuple[LeafSpec, ...],
                  into: Collection[str] | None) -> list[str]:
    """Replace, in ``graph`` (of ``root``), each call of a submodule the tracer would trace
    into by that submodule's own traced graph, with module paths and readable names as a
    trace of the whole model gives them. A call whose inputs or outputs cannot be mapped
    one to one (``*args``, an output used other than by indexing) stays a call.

    Returns:
        The tracer notes of the inlined submodules.
    """
    tracer = RetrofitTracer(leaves, into)
    notes: list[str] = []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for node in list(graph.nodes):
        if node.op != "call_module" or calls[str(node.target)] != 1:
            continue
        traced = _traced_call(root, node, tracer, leaves, into)
        if traced is not None:
            notes += [f"{node.target}: {n}" for n in traced[0].meta.get("retrofit_trace_notes", ())]
            _splice(graph, node, *traced)
    return notes


def _traced_call(root: nn.Module, node: torch.fx.Node, tracer: RetrofitTracer, leaves: tuple[LeafSpec, ...],
                 into: Collection[str] | None) -> tuple[torch.fx.GraphModule, dict[str, Any]] | None:
    """The graph of the submodule ``node`` calls, traced alone with the call's constant
    arguments fixed, and the call's arguments by name; None where the call stays a call (a
    leaf, arguments that are not single nodes, a forward that does not trace, a graph that
    does not map one to one onto the call)."""
    target = str(node.target)
    mod = root.get_submodule(target)
    if tracer.is_leaf_module(mod, target):
        return None
    try:
        bound = inspect.signature(mod.forward).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    constant = {k: v for k, v in list(bound.arguments.items())[1:] if v is None or type(v) in (bool, int, float, str)}
    if any(not isinstance(v, torch.fx.Node) for k, v in bound.arguments.items() if k not in constant):
        return None  # a structure of values (a list of tensors): kept as a call
    sub_into = None if into is None else {p[len(target) + 1:] for p in into if p.startswith(target + ".")}
    try:
        sub = trace(mod, relative_leaves(leaves, target), constant, sub_into)
    except TraceError:
        return None  # its forward does not trace alone (with these constants): kept as a call
    return (sub, dict(bound.arguments)) if _maps_onto(sub, mod, node, list(bound.arguments)) else None


def _maps_onto(sub: torch.fx.GraphModule, mod: nn.Module, node: torch.fx.Node, names: list[str]) -> bool:
    """Whether ``sub`` (``mod`` traced alone) can replace the call ``node``: no constant
    made on the traced copy, one placeholder per named argument, and one output or a
    structure only indexed by its users."""
    if any(n.op == "get_attr" and not _has_attr(mod, str(n.target)) for n in sub.graph.nodes):
        return False  # constants torch.fx made on the traced copy (a tensor literal)
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if flattens_inputs(sub) or any(str(p.target).lstrip("*") not in names or str(p.target).startswith("*")
                                   for p in placeholders):
        return False
    output = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    return isinstance(output, torch.fx.Node) or (
        isinstance(output, (tuple, list))
        and all(u.op == "call_function" and u.target is operator.getitem and type(u.args[1]) is int
                for u in node.users)
    )


def _splice(graph: torch.fx.Graph, node: torch.fx.Node, sub: torch.fx.GraphModule, arguments: dict[str, Any]) -> None:
    """Put ``sub``'s nodes in ``graph`` in place of the call ``node`` (of the submodule at
    its target), named and placed as a trace of the whole model gives them."""
    target = str(node.target)
    env: dict[torch.fx.Node, Any] = {p: arguments[str(p.target)] for p in sub.graph.nodes if p.op == "placeholder"}
    with graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            t = _prefix(target, str(n.target)) if n.op in ("call_module", "get_attr") else n.target
            new = graph.create_node(n.op, t, torch.fx.node.map_arg(n.args, env.__getitem__),
                                    torch.fx.node.map_arg(n.kwargs, env.__getitem__), name=n.name)
            new.meta.update(n.meta)
            new.meta["module_path"] = _prefix(target, n.meta.get("module_path", ""))
            new.meta["qualname"] = _prefix(target, n.meta.get("qualname", n.name)) if n.op not in (
                "call_module", "get_attr") else t
            env[n] = new
    output = next(n for n in sub.graph.nodes if n.op == "output").args[0]
    result = torch.fx.node.map_arg(output, env.__getitem__)
    if isinstance(result, torch.fx.Node):
        node.replace_all_uses_with(result)
    else:
        for user in list(node.users):
            user.replace_all_uses_with(result[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(node)


def _node_key(n: torch.fx.Node) -> tuple[str, str, str, str]:
    return (n.op, str(n.target), repr(n.args), repr(n.kwargs))


def _signature(graph: torch.fx.Graph) -> list[tuple[str, str, str, str]]:
    return [_node_key(n) for n in graph.nodes]


def _differing(a: torch.fx.Graph, b: torch.fx.Graph) -> list[torch.fx.Node]:
    keys_b = {_node_key(n) for n in b.nodes}
    keys_a = {_node_key(n) for n in a.nodes}
    return [n for n in a.nodes if _node_key(n) not in keys_b] + [n for n in b.nodes if _node_key(n) not in keys_a]


def _submodule_or_create(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in filter(None, path.split(".")):
        child = getattr(mod, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            mod.add_module(part, child)
        mod = child
    return mod


def _carry_unused_state(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Give ``gm`` the parameters and buffers its graph never touches.

    GraphModule keeps only what the traced forward uses; users expect every original
    name (unused heads, auxiliary layers) to survive, so their state dicts still load.
    """
    have = set(gm.state_dict(keep_vars=True))
    for mod_path, mod in model.named_modules():
        prefix = f"{mod_path}." if mod_path else ""
        for name, p in mod._parameters.items():
            if p is not None and prefix + name not in have:
                _submodule_or_create(gm, mod_path).register_parameter(name, p)
        for name, b in mod._buffers.items():
            if b is not None and prefix + name not in have and name not in mod._non_persistent_buffers_set:
                _submodule_or_create(gm, mod_path).register_buffer(name, b)


def _carry_metadata(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """Copy the model's plain-data attributes (timm's ``pretrained_cfg``, ``num_classes``, ...).

    ``timm.data.resolve_data_config(model=gm)`` and code that reads ``num_classes`` then work
    on the result as on the original. retrofit's own record of the model is not copied: the
    caller writes the result's.
    """
    for key, value in vars(model).items():
        if key.startswith("_") or key in ("training", META_ATTR) or hasattr(gm, key):
            continue
        if isinstance(value, (nn.Module, torch.Tensor)) or callable(value):
            continue
        setattr(gm, key, value)
