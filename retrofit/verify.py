"""Verification: does the rewritten model still compute what the original computed?"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .modes import eval_mode

__all__ = ["Comparison", "compare", "count_params", "input_dtype_device"]


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
    x = _probe(reference, input_size, batch_size, seed)
    if x is None:
        return None
    with torch.no_grad(), eval_mode(reference, candidate):
        want, flops_before = _run(reference, x)
        got, flops_after = _run(candidate, x)
    diff = 0.0
    for w, g in zip(want, got, strict=True):
        if isinstance(w, torch.Tensor) and isinstance(g, torch.Tensor):
            if w.shape != g.shape:
                diff = float("inf")
            elif w.numel():
                diff = max(diff, (w.double() - g.double()).abs().max().item())
    return Comparison(diff, flops_before, flops_after)
