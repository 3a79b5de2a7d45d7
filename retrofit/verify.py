"""Verification: does the rewritten model still compute what the original computed?"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .modes import eval_mode, plain_attributes_kept

__all__ = ["Reference", "compare_to", "count_params", "input_dtype_device", "reference_run"]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Comparison:
    """The two models run side by side on one probe input."""

    max_abs_diff: float  # largest |output difference|; inf if the output shapes differ
    flops_before: int  # FLOPs of one forward of the reference, per sample
    flops_after: int  # FLOPs of one forward of the candidate, per sample


def input_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of a model's input: those of its first parameter (float32, CPU if none)."""
    ref = next(iter(model.parameters()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return dtype, ref.device if ref is not None else torch.device("cpu")


def _probe(model: nn.Module, input_size: tuple[int, int, int], batch_size: int, seed: int) -> torch.Tensor | None:
    dtype, device = input_dtype_device(model)
    if device.type == "meta":
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *input_size), generator=gen).to(device=device, dtype=dtype)


def _run(model: nn.Module, x: torch.Tensor) -> tuple[list[object], int]:
    with FlopCounterMode(display=False) as counter:
        out = model(x)
    return pytree.tree_leaves(out), counter.get_total_flops() // x.shape[0]


@dataclass(frozen=True)
class Reference:
    """One run of the model before a rewrite: what a rewritten model is compared with."""

    inputs: torch.Tensor  # the seeded probe input
    outputs: tuple[object, ...]  # the output's leaves (tuple and dict outputs flattened)
    flops: int  # FLOPs of the forward, per sample


def reference_run(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1,
                  seed: int = 0) -> Reference | None:
    """Run ``model`` on one seeded random probe input, in eval mode without gradients, keeping
    its outputs and FLOPs: taken before a rewrite (an in-place one changes the model itself),
    it is the original the result is compared with. The model is left as it was: each
    submodule's mode, and the caches a forward fills (LeViT's attention biases), which a
    trace that follows must not find filled.

    Returns:
        The run, or None for a model on the ``meta`` device (nothing to run).
    """
    x = _probe(model, input_size, batch_size, seed)
    if x is None:
        return None
    with torch.no_grad(), eval_mode(model), plain_attributes_kept(model):
        outputs, flops = _run(model, x)
    return Reference(x, tuple(outputs), flops)


def compare_to(reference: Reference, candidate: nn.Module) -> Comparison:
    """Run ``candidate`` on the reference's input and compare outputs, leaf by leaf."""
    with torch.no_grad(), eval_mode(candidate):
        got, flops_after = _run(candidate, reference.inputs)
    diff = 0.0
    for w, g in zip(reference.outputs, got, strict=True):
        if isinstance(w, torch.Tensor) and isinstance(g, torch.Tensor):
            if w.shape != g.shape:
                diff = float("inf")
            elif w.numel():
                diff = max(diff, (w.double() - g.double()).abs().max().item())
    return Comparison(diff, reference.flops, flops_after)


def compare(
    reference: nn.Module,
    candidate: nn.Module,
    input_size: tuple[int, int, int],
    batch_size: int = 1,
    seed: int = 0,
) -> Comparison | None:
    """Run both models on one seeded random probe input; compare outputs and count FLOPs.

    Both run in eval mode without gradients; every submodule's mode is restored afterwards,
    and nothing of either model is written. Tuple and dict outputs are compared leaf by
    leaf. FLOPs are ``torch.utils.flop_counter``'s count (convolutions and matrix
    products; element-wise work such as a gate's multiply is not counted).

    Returns:
        The comparison, or None for models on the ``meta`` device (nothing to run).
    """
    ref = reference_run(reference, input_size, batch_size, seed)
    return None if ref is None else compare_to(ref, candidate)
