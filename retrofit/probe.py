"""The probe forward: what every submodule receives and returns in one forward of a model.

A model whose own forward does not trace is split into submodules that do
(:mod:`retrofit.partition`); each is traced alone on the inputs it got here. The probe runs
on fake tensors (nothing computed, nothing of the model written); a forward whose control
flow needs real values runs once for real on zeros, and the record says why.

Reads only: every submodule's train/eval mode and plain attributes are restored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .errors import TraceError, first_line
from .modes import eval_mode, plain_attributes_kept
from .shapes import TensorInfo
from .verify import input_dtype_device

__all__ = ["Call", "Flow", "Probe", "probe", "one_call"]

# One recorded call: positional and keyword inputs, tensors as TensorInfo.
Call = tuple[tuple[Any, ...], dict[str, Any]]
# A tensor seen in the probe: (id, version); an in-place op keeps the id and bumps the version.
TensorId = tuple[int, int]


@dataclass
class Flow:
    """Which tensors each module took and returned in a probe forward, by object identity
    (the tensors are kept alive, so identities stay unique)."""

    inputs: dict[str, list[set[TensorId]]]  # module path -> per call, the tensors among its inputs
    outputs: dict[str, list[set[TensorId]]]  # module path -> per call, the tensors among its outputs
    keep: list[Any]  # the tensors themselves


@dataclass(frozen=True)
class Probe:
    """What one probe forward recorded."""

    calls: dict[str, list[Call]]  # module path -> the inputs of each of its calls, in order
    flow: Flow  # the tensors each module took and returned
    fake_failure: str | None = None  # why the forward did not run on fake tensors (it then ran on zeros)


def _info(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype, value.device)
    return value


def _ids(value: Any, keep: list[Any]) -> set[TensorId]:
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

    def before(path: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
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
        handles.append(mod.register_forward_pre_hook(before(path), with_kwargs=True))
        handles.append(mod.register_forward_hook(after(path)))
    try:
        yield calls, flow
    finally:
        for h in handles:
            h.remove()


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


def _fake_forward(model: nn.Module, x: torch.Tensor) -> Probe:
    """The probe on fake copies of the model's parameters and buffers (``x``, a real empty
    tensor, is taken as a constant)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state: dict[str, torch.Tensor] = {
        n: mode.from_tensor(t) for n, t in [*model.named_parameters(), *model.named_buffers()]
    }
    with _recording(model) as (calls, flow), mode, _fake_tensor_log_off():
        torch.func.functional_call(model, state, (x,), tie_weights=False, strict=False)
    return Probe(calls, flow)


def probe(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 2) -> Probe:
    """The inputs every submodule receives in one forward of a ``(batch, *input_size)`` probe,
    and which tensors each module took and returned.

    The probe runs on fake tensors (nothing computed, nothing of the model written); a
    forward whose control flow needs real values (a branch on ``.item()``) runs once for
    real on zeros, in eval mode without gradients, and ``fake_failure`` says why. Every
    submodule's train/eval mode is restored afterwards.

    Raises:
        TraceError: the model does not run on the probe input.
    """
    dtype, device = input_dtype_device(model)
    shape = (batch_size, *input_size)
    with eval_mode(model), torch.no_grad(), plain_attributes_kept(model):
        try:
            return _fake_forward(model, torch.empty(shape, dtype=dtype, device=device))
        except Exception as e:  # control flow that reads values: run it for real below, saying why
            fake_failure = f"{type(e).__name__}: {first_line(e)}"
        try:
            with _recording(model) as (calls, flow):
                model(torch.zeros(shape, dtype=dtype, device=device))
        except Exception as e:
            raise TraceError(
                f"{type(model).__name__} does not run on a {tuple(shape)} probe input ({first_line(e)}); "
                "pass an input_size it runs on (a multiple of its largest stride, as 64 for a P6 YOLO)"
            ) from e
        return Probe(calls, flow, fake_failure)


def record_inputs(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 2) -> dict[str, list[Call]]:
    """The inputs every submodule receives in one forward of a ``(batch, *input_size)`` probe
    (see :func:`probe`)."""
    return probe(model, input_size, batch_size).calls


def one_call(calls: dict[str, list[Call]], path: str) -> Call | None:
    """The inputs the module at ``path`` was called with, if it was called, and always with
    the same ones."""
    recorded = calls.get(path, [])
    return recorded[0] if recorded and all(c == recorded[0] for c in recorded[1:]) else None
