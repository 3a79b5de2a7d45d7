"""Site analysis: where attention can go. Read-only: it inspects the graph, changes nothing.

Two kinds of site:

* ``residual-add``: an addition of two same-shaped NCHW tensors whose operands split from a
  common node, where one operand (the residual branch) runs through convolutions. The other
  operand is the shortcut: ``identity`` when it carries no parameters, else ``projection``.
* ``conv-block``: a 2-D convolution followed by any run of norm, activation, pooling and
  pass-through layers, each the only consumer of the one before (plain CNNs such as VGG).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .attention import registered_types
from .fuse import gated_residual
from .shapes import TensorInfo

__all__ = ["Site", "SkippedCandidate", "SiteAnalysis", "find_sites", "SITE_KINDS"]

SITE_KINDS: tuple[str, ...] = ("residual-add", "conv-block")

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}

_NORM_MODULES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
_NORM_FUNCTIONS = {F.batch_norm, F.group_norm, F.instance_norm, F.layer_norm, torch.batch_norm}
_ACT_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.mish,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.hardtanh, torch.tanh, F.prelu,
}
_ACT_METHODS = {"relu", "relu_", "tanh", "tanh_"}
_POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, torch.max_pool2d}
_PASS_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)
# Element-wise gates that are attention's own output, not a block's activation.
_NOT_ACTIVATIONS = (nn.Sigmoid, nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Hardsigmoid, nn.MultiheadAttention)


@dataclass(frozen=True)
class SiteRef:
    """A site named across passes (analysis, plan, refinement, rewrite): the traced unit
    whose graph holds it and its node there. Node names are unique within one graph only."""

    unit: str  # module path of the unit in the model ("" the root, or the one graph analysed)
    node: str  # fx node name of the site in that unit's graph


@dataclass(frozen=True)
class Site:
    """A place in the graph where an attention module can be inserted."""

    kind: str  # "residual-add" or "conv-block"
    path: str  # module path rules match: the block holding the add, or the conv's own path
    module_path: str  # qualified name of the module whose forward holds the site's node
    qualname: str  # readable name of the site's node ("layer1.0.add", "features.0")
    node: str  # fx node name of the add (residual-add) or of the block's last layer (conv-block)
    channels: int  # channels of the tensor attention sees
    size: tuple[int, int]  # its spatial size (H, W) for the analysed input
    dtype: torch.dtype  # its dtype
    device: torch.device  # its device
    branch: str | None = None  # residual-add: fx node name of the residual branch operand
    shortcut: str | None = None  # residual-add: fx node name of the shortcut operand
    shortcut_kind: str | None = None  # residual-add: "identity" or "projection"
    layers: tuple[str, ...] = ()  # conv-block: qualnames of conv, norm, act, pool in order
    mid: str | None = None  # residual-add: fx node name of the input of the branch's last conv
    mid_conv: str | None = None  # residual-add: fx node name of that last conv
    mid_channels: int | None = None  # residual-add: channels at `mid` (the bottleneck width)
    mid_size: tuple[int, int] | None = None  # residual-add: spatial size at `mid`
    existing: str | None = None  # attention the model already has where `branch`/`after` would go
    existing_mid: str | None = None  # attention the model already has where `mid` would go
    stage: int = 0  # 1-based stage: rank of the site's spatial size among sites of its kind, largest first
    block: int = 0  # 0-based index of the site within its stage, in graph order
    # Modules, as "path (Class)", that return this site's tensor / take it as their input, from a
    # probe forward; filled only when a rule asks (output_of, input_of)
    output_of: tuple[str, ...] = ()
    input_of: tuple[str, ...] = ()
    unit: str = ""  # module path in the model of the traced unit whose graph holds `node` (and the other nodes)

    @property
    def ref(self) -> SiteRef:
        """The site's identity across passes."""
        return SiteRef(self.unit, self.node)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (JSON-ready)."""
        return {
            "kind": self.kind,
            "path": self.path,
            "qualname": self.qualname,
            "channels": self.channels,
            "size": list(self.size),
            "stage": self.stage,
            "block": self.block,
            "shortcut": self.shortcut_kind,
            "mid_channels": self.mid_channels,
            "existing": self.existing,
            "layers": list(self.layers),
            **({"output_of": list(self.output_of)} if self.output_of else {}),
            **({"input_of": list(self.input_of)} if self.input_of else {}),
        }


@dataclass(frozen=True)
class SkippedCandidate:
    """A node that looked like a site but is not one, and why."""

    kind: str  # the site kind it was a candidate for
    qualname: str  # readable node name
    reason: str  # why it is not a site


@dataclass(frozen=True)
class SiteAnalysis:
    """Everything analysis found, in graph order."""

    sites: tuple[Site, ...]  # the sites, in graph (execution) order
    skipped: tuple[SkippedCandidate, ...] = field(default=())  # candidates that are not sites
    left_alone: tuple[tuple[str, str], ...] = ()  # (module path, why) for code no trace reached ("" = top level)

    def of_kind(self, kind: str) -> tuple[Site, ...]:
        """The sites of one kind."""
        return tuple(s for s in self.sites if s.kind == kind)

    def table(self) -> str:
        """A text table: a row per site, then a row per candidate that is not a site and why."""
        from tabulate import tabulate

        rows = [[s.path or "<root>", s.kind, s.channels, f"{s.size[0]}x{s.size[1]}", s.stage, s.block,
                 s.shortcut_kind or "", s.mid_channels or "", s.existing or ""] for s in self.sites]
        rows += [[c.qualname, c.kind, "", "", "", "", "", "", f"not a site: {c.reason}"] for c in self.skipped]
        return tabulate(rows, headers=["site", "kind", "channels", "size", "stage", "block", "shortcut", "mid",
                                       "existing attention / why not"])

    def __str__(self) -> str:
        return self.table()


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is_conv(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    mod = _module(gm, node)
    if mod is not None:
        return isinstance(mod, nn.Conv2d)
    return node.op == "call_function" and node.target in (F.conv2d, torch.conv2d)


def holds_conv(module: nn.Module) -> bool:
    """Whether ``module`` or anything inside it is a convolution: only then can it hold a site."""
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _contains_conv(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A convolution, or a leaf module with one inside (its channels are then unknown)."""
    if _is_conv(gm, node):
        return True
    mod = _module(gm, node)
    return mod is not None and holds_conv(mod)


def _has_params(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    mod = _module(gm, node)
    if mod is not None:
        return next(mod.parameters(), None) is not None
    return node.op == "get_attr"


def _module_role(mod: nn.Module) -> str | None:
    """'norm', 'act', 'pool' or 'pass' for a layer module that may follow a conv in a block."""
    if isinstance(mod, _NORM_MODULES):
        return "norm"
    if isinstance(mod, _POOL_MODULES):
        return "pool"
    if isinstance(mod, _PASS_MODULES) or type(mod).__name__ in ("DropPath", "DropBlock2d", "StochasticDepth"):
        return "pass"
    if isinstance(mod, _NOT_ACTIVATIONS):
        return None
    if type(mod).__module__ in ("torch.nn.modules.activation",) or type(mod).__module__.startswith(
        "timm.layers.activations"
    ):
        return "act"
    return None


def _is_conv_layer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A leaf module that is one 2-D convolution with its norm and activation, and nothing
    else: a library's conv layer whose own forward does not trace (transformers' MobileNetV1
    layers compute TensorFlow-style padding from the input's shape), called whole. Its
    output is a conv block's output as much as the three layers' would be."""
    mod = _module(gm, node)
    if mod is None or isinstance(mod, nn.modules.conv._ConvNd):
        return False
    layers = [m for m in mod.modules() if m is not mod and next(m.children(), None) is None]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    return len(convs) == 1 and all(m is convs[0] or _module_role(m) in ("norm", "act", "pass") for m in layers)


def _layer_role(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """'norm', 'act', 'pool' or 'pass' for a layer that may follow a conv in a block."""
    mod = _module(gm, node)
    if mod is not None:
        return _module_role(mod)
    if node.op == "call_function":
        if node.target in _NORM_FUNCTIONS:
            return "norm"
        if node.target in _ACT_FUNCTIONS:
            return "act"
        if node.target in _POOL_FUNCTIONS:
            return "pool"
        if node.target is F.dropout:
            return "pass"
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return "act"
    return None


_LAYOUT_OPS = {"permute", "transpose", "view", "reshape", "flatten", "unflatten", "movedim", "swapaxes"}


def _is_layout_op(node: torch.fx.Node) -> bool:
    """An op that moves or merges dimensions (so dim 1 may no longer be channels)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name in _LAYOUT_OPS


def _add_operands(node: torch.fx.Node) -> tuple[Any, Any] | None:
    """The two summands of an addition node, or None if the node is not one.

    ``torch.add(a, b, alpha=...)`` with alpha other than 1 is a weighted sum, not a residual.
    """
    if node.op == "call_function" and node.target is gated_residual:
        return node.args[1], node.args[2]  # a site retrofit already fused: (branch, shortcut)
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return None
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
        return None
    other = node.kwargs.get("other", node.args[1] if len(node.args) > 1 else None)
    return node.args[0], other


class _Analyzer:
    def __init__(self, gm: torch.fx.GraphModule, shapes: dict[str, TensorInfo], unit: str) -> None:
        self.gm = gm
        self.shapes = shapes
        self.unit = unit
        self.graph = nx.DiGraph()
        for node in gm.graph.nodes:
            self.graph.add_node(node.name)
            for src in node.all_input_nodes:
                self.graph.add_edge(src.name, node.name)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.skipped: list[SkippedCandidate] = []

    def skip(self, kind: str, node: torch.fx.Node, reason: str) -> None:
        self.skipped.append(SkippedCandidate(kind, node.meta.get("qualname", node.name), reason))

    def _path_nodes(self, split: str, end: str) -> list[torch.fx.Node]:
        """Nodes strictly after ``split`` on the paths from ``split`` to ``end``, ``end`` included."""
        if end == split:
            return []
        names = (nx.ancestors(self.graph, end) & nx.descendants(self.graph, split)) | {end}
        return [self.nodes[n] for n in names]

    def residual(self, node: torch.fx.Node) -> Site | None:
        kind = "residual-add"
        summands = self._summands(node)
        if summands is None:
            return None
        a, b, out = summands
        split = nx.lowest_common_ancestor(self.graph, a.name, b.name)
        if split is None:
            self.skip(kind, node, "operands share no common input")
            return None
        branch, shortcut, branch_path, shortcut_params = self._branch_and_shortcut(split, a, b)
        convs = [n for n in branch_path if _contains_conv(self.gm, n)]
        if not convs:
            self.skip(kind, node, "no convolution on either operand's path (not a conv residual)")
            return None
        why = self._not_nchw(max(convs, key=self._order), branch_path, out)
        if why is not None:
            self.skip(kind, node, why)
            return None
        holder = node.meta.get("module_path", "")
        mid = self._mid(branch_path)
        mid_info = self.shapes.get(mid[0].name) if mid else None
        return Site(
            kind=kind,
            path=holder,
            module_path=holder,
            qualname=node.meta.get("qualname", node.name),
            node=node.name,
            channels=out.shape[1],
            size=(out.shape[2], out.shape[3]),
            dtype=out.dtype,
            device=out.device,
            branch=branch.name,
            shortcut=shortcut.name,
            shortcut_kind="projection" if shortcut_params else "identity",
            mid=mid[0].name if mid and mid_info else None,
            mid_conv=mid[1].name if mid and mid_info else None,
            existing=self._fused(node) or self._existing(branch),
            existing_mid=self._existing(mid[0]) if mid and mid_info else None,
            mid_channels=mid_info.shape[1] if mid_info else None,
            mid_size=(mid_info.shape[2], mid_info.shape[3]) if mid_info else None,
            unit=self.unit,
        )

    def _summands(self, node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, TensorInfo] | None:
        """The two summands of an addition of two same-shaped NCHW tensors, and its output;
        None (with the reason recorded where it is worth one) for anything else."""
        operands = _add_operands(node)
        if operands is None:
            return None
        a, b = operands
        if not isinstance(a, torch.fx.Node) or not isinstance(b, torch.fx.Node):
            return None  # adding a constant (bias, scalar) is not a residual
        ia, ib, out = self.shapes.get(a.name), self.shapes.get(b.name), self.shapes.get(node.name)
        if ia is None or ib is None or out is None:
            return None
        if not out.is_nchw:
            self.skip("residual-add", node, f"not a 4-D NCHW tensor (shape {list(out.shape)})")
            return None
        if ia.shape != ib.shape:
            self.skip("residual-add", node, f"operands differ in shape ({list(ia.shape)} + {list(ib.shape)}): a "
                                            "broadcast, not a residual")
            return None
        return a, b, out

    def _branch_and_shortcut(self, split: str, a: torch.fx.Node,
                             b: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node, list[torch.fx.Node], int]:
        """``(branch, shortcut, the branch's nodes after the split, parameterised nodes on the
        shortcut)``: the shortcut is the operand that is the split point itself, else the
        lighter path."""
        path_a, path_b = self._path_nodes(split, a.name), self._path_nodes(split, b.name)
        params_a = sum(_has_params(self.gm, n) for n in path_a)
        params_b = sum(_has_params(self.gm, n) for n in path_b)
        if b.name == split or (a.name != split and (params_a, len(path_a)) >= (params_b, len(path_b))):
            return a, b, path_a, params_b
        return b, a, path_b, params_a

    def _not_nchw(self, last_conv: torch.fx.Node, branch_path: list[torch.fx.Node], out: TensorInfo) -> str | None:
        """Why the sum is not an NCHW tensor though it is 4-D, or None.

        Channels that differ from the last conv's are fine when no op in between moves
        dimensions (GhostNet concatenates and slices channels); after a permute they are
        the sign of a channels-last tensor, which an NCHW attention would misread.
        """
        mod = _module(self.gm, last_conv)
        after_conv = nx.descendants(self.graph, last_conv.name)
        relayout = [n for n in branch_path if n.name in after_conv and _is_layout_op(n)]
        if not (isinstance(mod, nn.Conv2d) and mod.out_channels != out.shape[1] and relayout):
            return None
        return (f"dim 1 has {out.shape[1]} entries but the branch's last conv {last_conv.meta['qualname']!r} "
                f"has {mod.out_channels} output channels and {relayout[0].meta.get('qualname', relayout[0].name)!r} "
                "moves dimensions after it: not an NCHW tensor")

    def _mid(self, branch_path: list[torch.fx.Node]) -> tuple[torch.fx.Node, torch.fx.Node] | None:
        """(input of the branch's last conv, that conv) when the branch has two or more convs.

        In a bottleneck block that input carries the narrow middle channels, where attention
        costs a fraction of what it costs at the block's output.
        """
        convs = sorted((n for n in branch_path if _is_conv(self.gm, n)), key=self._order)
        if len(convs) < 2:
            return None
        last = convs[-1]
        src = last.args[0] if last.args else None
        if not isinstance(src, torch.fx.Node) or src not in branch_path:
            return None
        info = self.shapes.get(src.name)
        if info is None or not info.is_nchw:
            return None
        return src, last

    def _existing(self, node: torch.fx.Node) -> str | None:
        """Attention the model already applies to produce ``node``, or None.

        Walks back over pass-through layers (dropout, drop-path, identity) to a module of a
        registered attention type, or to a gating multiply ``x * g`` where ``g`` is computed
        from ``x`` through a reduction (pooling): SE, ECA, CBAM, GE and their kin.
        """
        for _ in range(4):
            mod = _module(self.gm, node)
            if mod is not None and isinstance(mod, registered_types()):
                return f"{type(mod).__name__} at {node.target!r}"
            if self._is_gating_mul(node):
                path = node.meta.get("module_path", "") or node.meta.get("qualname", node.name)
                return f"a gate at {path!r}"
            if _layer_role(self.gm, node) != "pass" or not node.all_input_nodes:
                return None
            node = node.all_input_nodes[0]
        return None

    def _fused(self, node: torch.fx.Node) -> str | None:
        """The attention of a residual add retrofit fused into ``gated_residual``, or None."""
        if node.op != "call_function" or node.target is not gated_residual:
            return None
        ref = node.args[0]
        target = str(ref.target if isinstance(ref, torch.fx.Node) else ref)
        return f"{type(self.gm.get_submodule(target)).__name__} at {target!r}"

    def _is_gating_mul(self, node: torch.fx.Node) -> bool:
        is_mul = (node.op == "call_function" and node.target in (operator.mul, torch.mul)) or (
            node.op == "call_method" and node.target in ("mul", "mul_")
        )
        if not is_mul or len(node.all_input_nodes) != 2:
            return False
        for x, g in (node.all_input_nodes, node.all_input_nodes[::-1]):
            info = self.shapes.get(x.name)
            if info is None or g.name not in nx.descendants(self.graph, x.name):
                continue
            size = math.prod(info.shape)
            between = nx.ancestors(self.graph, g.name) & nx.descendants(self.graph, x.name)
            if any(n in self.shapes and math.prod(self.shapes[n].shape) < size for n in between | {g.name}):
                return True
        return False

    def conv_block(self, node: torch.fx.Node) -> Site | None:
        if not (_is_conv(self.gm, node) or _is_conv_layer(self.gm, node)):
            return None
        info = self.shapes.get(node.name)
        if info is None or not info.is_nchw:
            self.skip("conv-block", node, "conv output is not a 4-D NCHW tensor")
            return None
        layers, last = [node], node
        while len(last.users) == 1:
            nxt = next(iter(last.users))
            if _layer_role(self.gm, nxt) is None or nxt.all_input_nodes != [last]:
                break
            if not (self.shapes.get(nxt.name) and self.shapes[nxt.name].is_nchw):
                break
            layers.append(nxt)
            last = nxt
        out = self.shapes[last.name]
        return Site(
            kind="conv-block",
            path=node.meta.get("qualname", node.name),
            module_path=node.meta.get("module_path", ""),
            qualname=node.meta.get("qualname", node.name),
            node=last.name,
            channels=out.shape[1],
            size=(out.shape[2], out.shape[3]),
            dtype=out.dtype,
            device=out.device,
            layers=tuple(n.meta.get("qualname", n.name) for n in layers),
            existing=next((self._existing(u) for u in last.users if self._existing(u)), None),
            unit=self.unit,
        )

    def _order(self, node: torch.fx.Node) -> int:
        return self._index[node.name]

    def run(self) -> SiteAnalysis:
        self._index = {n.name: i for i, n in enumerate(self.gm.graph.nodes)}
        sites: list[Site] = []
        for node in self.gm.graph.nodes:
            site = self.residual(node) or self.conv_block(node)
            if site is not None:
                sites.append(site)
        return SiteAnalysis(number_stages(sites), tuple(self.skipped))


def number_stages(sites: list[Site]) -> tuple[Site, ...]:
    """Number stages per site kind by spatial size, largest first, and blocks within them."""
    out: list[Site] = []
    for kind in SITE_KINDS:
        of_kind = [s for s in sites if s.kind == kind]
        areas = sorted({s.size[0] * s.size[1] for s in of_kind}, reverse=True)
        counts: dict[int, int] = {}
        for s in of_kind:
            stage = areas.index(s.size[0] * s.size[1]) + 1
            out.append(replace(s, stage=stage, block=counts.get(stage, 0)))
            counts[stage] = counts.get(stage, 0) + 1
    order = {s.ref: i for i, s in enumerate(sites)}
    return tuple(sorted(out, key=lambda s: order[s.ref]))


def find_sites(gm: torch.fx.GraphModule, shapes: dict[str, TensorInfo], unit: str = "") -> SiteAnalysis:
    """Find every residual-add and conv-block site of a traced model.

    Args:
        gm: a GraphModule from :func:`retrofit.trace.trace`.
        shapes: node shapes from :func:`retrofit.shapes.propagate_shapes`.
        unit: the module path, in the model, of what ``gm`` traced (a submodule traced
            alone); each site's ``unit``. Paths stay relative to ``gm``.

    Returns:
        The sites in graph order, and the candidates rejected with their reasons.
    """
    return _Analyzer(gm, shapes, unit).run()
