"""What the transfer experiments compute from their runs: paired statistics against plain
fine-tuning, and how far the inserted modules moved from identity.

Statistics: every variant is compared with plain fine-tuning seed by seed (the same data
order, augmentation and head init), so the paired difference removes what the seed does
to both. Its mean gets a 95% confidence interval from the t distribution with n - 1
degrees of freedom; a variant *pays* when the whole interval is above zero, *hurts* when it
is below, and is *noise* when it holds zero. The sign count says on how many seeds the
variant was better.

Gate movement: a gating module (forward ``x * g(x)``; SE, ECA, CBAM, coordinate attention)
is read with :func:`retrofit.gates.record_gates`: ``|g - 1|`` per image and channel (spatial
gates averaged over the map), its mean and 95th percentile over the images; and, since that
averages a spatial gate away and sees only CBAM's channel gate, every gate of the module's
chain at full resolution too. The larger is the module's movement. An additive module (forward ``x + delta(x)``; GC with add fusion, non-local) has
no gate: the ratio ``||delta(x)|| / ||x||`` per image says how much it changes the
features, its mean and 95th percentile over the images. Identity insertion makes both 0.

Imported by name from ``examples/`` like its siblings.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Paired", "paired", "gate_movement", "LEVEL"]

LEVEL = 0.95  # the confidence level of the intervals


@dataclass(frozen=True)
class Paired:
    """A variant against plain fine-tuning, seed by seed (variant - plain)."""

    seeds: tuple[int, ...]  # the seeds both have, ascending
    diffs: tuple[float, ...]  # variant - plain, per seed
    mean: float  # mean difference
    std: float  # sample standard deviation of the differences (NaN for one seed)
    low: float  # lower end of the 95% t interval of the mean (NaN for one seed)
    high: float  # upper end
    better: int  # seeds on which the variant scored higher
    worse: int  # seeds on which it scored lower

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def verdict(self) -> str:
        """``pays`` (the interval is above zero), ``hurts`` (below), ``noise`` (holds zero),
        or ``too few seeds`` (fewer than two)."""
        if self.n < 2:
            return "too few seeds"
        if self.low > 0:
            return "pays"
        if self.high < 0:
            return "hurts"
        return "noise"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN as None)."""
        d = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}
        return {**d, "n": self.n, "verdict": self.verdict}


def _t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired(variant: Mapping[int, float], plain: Mapping[int, float]) -> Paired | None:
    """The paired comparison over the seeds both runs have; None when they share none."""
    seeds = tuple(sorted(set(variant) & set(plain)))
    if not seeds:
        return None
    diffs = tuple(variant[s] - plain[s] for s in seeds)
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        std = low = high = math.nan
    else:
        std = statistics.stdev(diffs)
        half = _t_quantile(0.5 + LEVEL / 2, len(diffs) - 1) * std / math.sqrt(len(diffs))
        low, high = mean - half, mean + half
    return Paired(seeds, diffs, mean, std, low, high, sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))


# --------------------------------------------------------------------------- gate movement


def _summary(values: Tensor) -> tuple[float, float]:
    v = values.double().flatten()
    return float(v.mean()), float(torch.quantile(v, 0.95))


@torch.no_grad()
def _per_module(model: nn.Module, modules: Mapping[str, nn.Module], measure: Any,
                batches: Iterable[Tensor]) -> dict[str, Any]:
    """Run ``model`` on ``batches`` (eval mode, left as found) with a pre-hook on each of
    ``modules`` that calls ``measure(module, input)``; per module, what the calls returned, concatenated."""
    got: dict[str, list[Any]] = {name: [] for name in modules}
    handles = [mod.register_forward_pre_hook(lambda m, args, name=name: got[name].append(measure(m, args[0])))
               for name, mod in modules.items()]
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for x in batches:
            model(x.to(device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return got


def _added_ratio(m: nn.Module, x: Tensor) -> Tensor:
    """``||delta(x)|| / ||x||`` of each image."""
    d = m.delta(x)  # type: ignore[operator]
    return (d.expand_as(x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)).double().cpu()


def _gate_distances(m: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """``|g - 1|`` of every gate of the module's chain, every element (image, channel,
    position), each gate computed on what the gates before it left, as the forward does."""
    from retrofit.attention import gate_methods

    out, y = {}, x
    for method in gate_methods(m) or ():
        g = getattr(m, method)(y)
        out[method] = (g.float() - 1).abs().flatten().cpu()
        y = y * g
    return out


def gate_movement(model: nn.Module, images: Tensor, batch_size: int = 256) -> list[dict[str, Any]]:
    """How far every module retrofit inserted in ``model`` has moved from identity, on
    ``images`` (N, C, H, W): one record per module, in graph order.

    ``kind`` ``gate``: ``channel`` is :func:`retrofit.gates.record_gates`' channel gate
    (|g - 1| per image and channel, a spatial gate averaged over the map), ``per_gate`` every
    gate of the module's chain at full resolution (CBAM's channel and spatial gates;
    coordinate attention's gate at every position); ``mean`` and ``p95`` are the largest of
    these. ``kind`` ``added``: ``||delta(x)|| / ||x||`` per image. ``kind`` ``none``: neither.

    Read-only: the model is run in eval mode and left as it was found.
    """
    import retrofit
    from retrofit.gates import record_gates

    rows = retrofit.get_report(model).rows
    record = record_gates(model, images, batch_size=batch_size)
    gated = {s.module: s for s in record.sites}
    named = dict(model.named_modules())
    additive = {r.module: named[r.module] for r in rows
                if r.module not in gated and callable(getattr(named.get(r.module), "delta", None))}

    def batches() -> Iterable[Tensor]:
        return (images[i:i + batch_size] for i in range(0, len(images), batch_size))

    added = {k: torch.cat(v) for k, v in _per_module(model, additive, _added_ratio, batches()).items() if v}
    chains = _per_module(model, {k: named[k] for k in gated}, _gate_distances, batches()) if gated else {}
    out = []
    for r in rows:
        base = {"module": r.module, "path": r.path, "attn": r.attn, "gate": r.gate, "channels": r.channels}
        if r.module in gated:
            channel = _summary((gated[r.module].values - 1).abs())
            per_gate = {method: _summary(torch.cat([call[method] for call in chains[r.module]]))
                        for method in (chains[r.module][0] if chains.get(r.module) else {})}
            mean = max([channel[0], *(v[0] for v in per_gate.values())])
            p95 = max([channel[1], *(v[1] for v in per_gate.values())])
            out.append({**base, "kind": "gate", "method": gated[r.module].method, "mean": mean, "p95": p95,
                        "channel": {"mean": channel[0], "p95": channel[1]},
                        "per_gate": {k: {"mean": v[0], "p95": v[1]} for k, v in per_gate.items()}})
        elif r.module in added:
            mean, p95 = _summary(added[r.module])
            out.append({**base, "kind": "added", "mean": mean, "p95": p95})
        else:
            out.append({**base, "kind": "none", "mean": None, "p95": None})
    return out
