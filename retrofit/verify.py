"""Verification: does the rewritten model still compute what the original computed?"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["max_abs_diff", "count_params", "eval_mode"]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode and restore every submodule's own mode afterwards."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _probe(model: nn.Module, input_size: tuple[int, int, int], batch_size: int, seed: int) -> torch.Tensor | None:
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    if device.type == "meta":
        return None
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *input_size), generator=gen).to(device=device, dtype=dtype)


def max_abs_diff(
    reference: nn.Module,
    candidate: nn.Module,
    input_size: tuple[int, int, int],
    batch_size: int = 1,
    seed: int = 0,
) -> float | None:
    """Largest absolute difference between the two models' outputs on one random probe input.

    Both run in eval mode without gradients; every submodule's mode is restored afterwards,
    and nothing of either model is written. Tuple and dict outputs are compared leaf by leaf.

    Returns:
        The difference, or None for models on the ``meta`` device (nothing to run).
    """
    x = _probe(reference, input_size, batch_size, seed)
    if x is None:
        return None
    with torch.no_grad(), eval_mode(reference, candidate):
        want = pytree.tree_leaves(reference(x))
        got = pytree.tree_leaves(candidate(x))
    diff = 0.0
    for w, g in zip(want, got, strict=True):
        if isinstance(w, torch.Tensor):
            if w.shape != g.shape:
                return float("inf")
            if w.numel():
                diff = max(diff, (w.float() - g.float()).abs().max().item())
    return diff
