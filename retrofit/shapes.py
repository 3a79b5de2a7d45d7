"""Shape propagation on fake tensors: every node's output shape without a real forward pass.

Like ``torch.fx.passes.shape_prop.ShapeProp``, but the model's parameters and buffers are
swapped for fake copies per call, so nothing is computed, nothing of the model is written
(BatchNorm's running statistics included), and models on the ``meta`` device work too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    unset_fake_temporarily,
)

from .errors import OptionError, TraceError, first_line
from .modes import eval_mode, plain_attributes_kept
from .verify import input_dtype_device

__all__ = ["TensorInfo", "propagate_shapes", "resolve_input_size"]


@dataclass(frozen=True)
class TensorInfo:
    """What shape propagation learned about one node's tensor output."""

    shape: tuple[int, ...]  # full shape, batch first
    dtype: torch.dtype  # dtype of the activation
    device: torch.device  # device the activation lives on

    @property
    def is_nchw(self) -> bool:
        """Whether this is a 4-D (N, C, H, W) tensor."""
        return len(self.shape) == 4


def _target_name(n: torch.fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


class _FakeInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, mode: FakeTensorMode) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.extra_traceback = False  # run_node's message names the node; torch's lines would only follow it
        self.mode = mode
        self.infos: dict[str, TensorInfo] = {}
        self._fakes: dict[int, torch.Tensor] = {}

    def _fake(self, t: torch.Tensor) -> torch.Tensor:
        key = id(t)
        if key not in self._fakes:
            self._fakes[key] = self.mode.from_tensor(t)
        return self._fakes[key]

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            with self.mode:
                out = super().run_node(n)
        except Exception as e:
            # torch appends the node and a pointer to its own logs on further lines; the
            # first line is the failure.
            raise TraceError(
                f"shape propagation failed at node {n.meta.get('qualname', n.name)!r} "
                f"({n.op} {_target_name(n)}): {first_line(e)}. Check the input size (input_size=..., "
                "CLI --input-size: 224, 224x224 or 3x224x224)"
            ) from e
        if isinstance(out, torch.Tensor):
            self.infos[n.name] = TensorInfo(tuple(out.shape), out.dtype, out.device)
        return out

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self._fake(value) if isinstance(value, torch.Tensor) else value

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        # symbolic_shapes pulls in sympy (~0.5 s): imported when shapes are first propagated
        from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

        mod = self.fetch_attr(target)
        state = {name: self._fake(t) for name, t in mod.named_parameters()}
        state.update({name: self._fake(t) for name, t in mod.named_buffers()})
        try:
            return torch.func.functional_call(mod, state, args, kwargs, tie_weights=False, strict=False)
        except DynamicOutputShapeException:
            raise
        except (DataDependentOutputException, GuardOnDataDependentSymNode):
            # A leaf module with data-dependent control flow (the reason it is a leaf)
            # cannot run on fake tensors: run it once for real on zeros, in eval mode.
            return self._run_real(mod, args, kwargs)

    def _run_real(self, mod: torch.nn.Module, args: Any, kwargs: Any) -> Any:
        def real(a: Any) -> Any:
            return torch.zeros(a.shape, dtype=a.dtype, device=a.device) if isinstance(a, torch.Tensor) else a

        with unset_fake_temporarily(), eval_mode(mod):
            out = mod(*pytree.tree_map(real, args), **pytree.tree_map(real, kwargs))
        return pytree.tree_map(lambda t: self.mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, out)


def propagate_shapes(
    gm: torch.fx.GraphModule,
    input_size: tuple[int, int, int] | None,
    batch_size: int = 2,
    inputs: tuple[Any, ...] | None = None,
) -> dict[str, TensorInfo]:
    """Shapes of every tensor-valued node of ``gm`` for an input of ``input_size`` (C, H, W).

    The input gets the dtype and device of the model's first parameter. ``batch_size`` is 2
    so that train-mode BatchNorm on a 1x1 map still has more than one value per channel.
    ``inputs`` replaces the single image input: one value per placeholder, a
    :class:`TensorInfo` where the graph takes a tensor (a submodule's recorded inputs).

    Returns:
        ``{node name: TensorInfo}``.
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    if inputs is None:
        if input_size is None:
            raise OptionError("propagate_shapes needs input_size or inputs")
        dtype, device = input_dtype_device(gm)
        inputs = (TensorInfo((batch_size, *input_size), dtype, device),)
    with mode:
        args = tuple(torch.empty(a.shape, dtype=a.dtype, device=a.device) if isinstance(a, TensorInfo) else a
                     for a in inputs)
    interp = _FakeInterpreter(gm, mode)
    with torch.no_grad(), plain_attributes_kept(gm):
        interp.run(*args)
    return interp.infos


def resolve_input_size(model: torch.nn.Module, input_size: int | tuple[int, ...] | None) -> tuple[int, int, int]:
    """The (C, H, W) input size: the caller's, else timm's pretrained config, else 224x224.

    ``input_size`` may be an int (square, channels from the model), ``(H, W)`` or
    ``(C, H, W)``. Without a config the channel count is the first convolution's
    ``in_channels`` (3 when the model has none).
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if input_size is None and len(cfg.get("input_size") or ()) == 3:
        c, h, w = (int(v) for v in cfg["input_size"])
        return (c, h, w)
    chans = next(
        (m.in_channels for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), 3
    )
    if input_size is None:
        return (chans, 224, 224)
    if isinstance(input_size, int):
        return (chans, input_size, input_size)
    size = tuple(int(v) for v in input_size)
    if len(size) == 1:
        return (chans, size[0], size[0])
    if len(size) == 2:
        return (chans, *size)
    if len(size) == 3:
        return size
    raise OptionError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")
