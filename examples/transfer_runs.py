"""The plan of a transfer experiment, shared by the classification and detection runs:
which units there are, how the attention learning rate is chosen, and which units count.

A unit is one fine-tuning run: a target size, a variant, an attention lr multiplier and a
seed (``target<size>/<variant>/attn-lr-x<m>/seed<s>``; plain fine-tuning has no multiplier,
``default``). On the first seed every variant with attention runs at every multiplier of
the grid; the one with the best final validation score (ties: the earlier in the grid) is
the variant's choice for that size, and the other seeds run only it. The test split is
never used to choose.

Imported by name from ``examples/`` like its siblings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

__all__ = ["VariantLike", "unit_key", "chosen_mult", "seed_plan", "run_plan", "collect"]


class VariantLike(Protocol):
    """What the plan needs of a variant."""

    @property
    def name(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def plain(self) -> bool: ...


def unit_key(size: int, name: str, mult: float | None, seed: int) -> str:
    return f"target{size}/{name}/{'default' if mult is None else f'attn-lr-x{mult:g}'}/seed{seed}"


def chosen_mult(records: Mapping[str, Mapping[str, Any]], size: int, name: str, mults: Sequence[float],
                first_seed: int, score: str) -> float | None:
    """The multiplier with the best final validation ``score`` on the first seed (ties: the
    earlier in ``mults``); None until every grid point of the first seed is done."""
    scores = []
    for i, m in enumerate(mults):
        r = records.get(unit_key(size, name, m, first_seed))
        if r is None:
            return None
        scores.append((r[score], -i, m))
    return max(scores)[2]


def seed_plan(records: Mapping[str, Mapping[str, Any]], size: int, seed: int, variants: Sequence[VariantLike],
              mults: Sequence[float], seeds: Sequence[int], score: str) -> list[tuple[Any, float | None]]:
    """(variant, multiplier) of the units of one size and seed, in run order.

    Raises:
        RuntimeError: a later seed, while the first seed's selection of a variant is not done.
    """
    plan: list[tuple[Any, float | None]] = []
    for v in variants:
        if v.plain:
            plan.append((v, None))
        elif seed == seeds[0]:
            plan += [(v, m) for m in mults]
        else:
            m = chosen_mult(records, size, v.name, mults, seeds[0], score)
            if m is None:
                raise RuntimeError(f"{v.name}, size {size}: the first seed's choice of the attention lr is not made")
            plan.append((v, m))
    return plan


def run_plan(records: Callable[[], Mapping[str, Mapping[str, Any]]], *, sizes: Sequence[int],
             seeds: Sequence[int], variants: Sequence[VariantLike], mults: Sequence[float], score: str,
             start: Callable[[int, Any, float | None, int], Mapping[str, Any] | None],
             poll_seconds: float = 15.0) -> None:
    """Every unit of the plan, in plan order (size, seed, variant), shared with other processes.

    ``start(size, variant, mult, seed)`` runs the unit, or reads it when it exists, and
    returns its record; None when another process holds it. Such a unit, and a later
    seed's unit of a variant whose first-seed choice is not made yet, are passed over and
    come back in the next pass, so that several processes on one run each work on a
    different unit instead of waiting on one. ``records()`` reads the finished units.
    """
    while True:
        pending, done = False, records()
        for size in sizes:
            for seed in seeds:
                for v in variants:
                    try:
                        plan = seed_plan(done, size, seed, [v], mults, seeds, score)
                    except RuntimeError:  # the first seed's choice is being made by another process
                        pending = True
                        continue
                    for _, m in plan:
                        if unit_key(size, v.name, m, seed) in done:
                            continue
                        if start(size, v, m, seed) is None:
                            pending = True
                        else:  # read again once a unit is stored: a later seed may need its choice
                            done = records()
        if not pending:
            return
        time.sleep(poll_seconds)


def collect(records: Mapping[str, Mapping[str, Any]], *, sizes: Sequence[int], epochs: Sequence[int],
            seeds: Sequence[int], mults: Sequence[float], variants: Sequence[VariantLike],
            score: str) -> dict[str, Any]:
    """Per size, per variant: the units that count (plain, and each variant at its chosen
    multiplier, over the seeds done so far) and the first seed's validation scores."""
    out: dict[str, Any] = {}
    for size, n_epochs in zip(sizes, epochs, strict=True):
        rows: dict[str, Any] = {}
        for v in variants:
            m = None if v.plain else chosen_mult(records, size, v.name, mults, seeds[0], score)
            selection = None if v.plain else {
                f"x{g:g}": records[k][score] for g in mults if (k := unit_key(size, v.name, g, seeds[0])) in records}
            if not v.plain and m is None:
                rows[v.name] = {"label": v.label, "attn_lr_mult": None, "selection": selection, "units": []}
                continue
            units = [dict(records[k]) for k in (unit_key(size, v.name, m, s) for s in seeds) if k in records]
            rows[v.name] = {"label": v.label, "attn_lr_mult": m, "selection": selection, "units": units}
        out[str(size)] = {"epochs": n_epochs, "rows": rows}
    return out
