"""The report of one rewrite: a row per inserted module, totals, and the identity check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tabulate import tabulate

__all__ = ["SiteRow", "Report"]


@dataclass(frozen=True)
class SiteRow:
    """One inserted attention module."""

    path: str  # site path ("layer3.2", or the conv's path for conv blocks)
    kind: str  # site kind
    channels: int  # channels the module sees
    size: tuple[int, int]  # spatial size (H, W) at the analysed input size
    attn: str  # attention name
    gate: str  # gate form
    position: str  # "branch" or "after"
    module: str  # qualified name of the new submodule
    params: int  # parameters the module added

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "channels": self.channels,
            "size": list(self.size),
            "attn": self.attn,
            "gate": self.gate,
            "position": self.position,
            "module": self.module,
            "params": self.params,
        }


@dataclass(frozen=True)
class Report:
    """What ``retrofit()`` did to a model. Reach it with ``retrofit.get_report(gm)``."""

    model: str  # class name of the input model
    input_size: tuple[int, int, int]  # (C, H, W) used for shapes and the probe
    rows: tuple[SiteRow, ...]  # inserted modules, in graph order
    sites_found: int  # sites analysis found, of every kind
    skipped: tuple[tuple[str, str], ...]  # (site path, reason) for sites a rule looked at but left
    params_before: int  # parameters of the input model
    params_after: int  # parameters of the result
    max_abs_diff: float | None  # max |output difference| on the probe input; None if not run
    identity_expected: bool  # True when every inserted gate is an identity gate
    notes: tuple[str, ...] = ()  # remarks from planning

    @property
    def params_added(self) -> int:
        return self.params_after - self.params_before

    @property
    def identity_ok(self) -> bool | None:
        """Whether the identity check passed (None when it did not run or was not expected)."""
        if self.max_abs_diff is None or not self.identity_expected:
            return None
        return self.max_abs_diff == 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (JSON-ready)."""
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_added": self.params_added,
            "sites_found": self.sites_found,
            "sites_changed": len(self.rows),
            "sites_skipped": len(self.skipped),
            "max_abs_diff": self.max_abs_diff,
            "identity_expected": self.identity_expected,
            "sites": [r.to_dict() for r in self.rows],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """The totals as a two-column table."""
        pct = 100.0 * self.params_added / self.params_before if self.params_before else 0.0
        if self.max_abs_diff is None:
            check = "not run"
        elif self.identity_expected:
            check = f"{self.max_abs_diff:.3g} ({'exact identity' if self.max_abs_diff == 0 else 'NOT identity'})"
        else:
            check = f"{self.max_abs_diff:.3g} (sigmoid gates change outputs)"
        rows = [
            ["model", self.model],
            ["input size", "x".join(map(str, self.input_size))],
            ["parameters before", f"{self.params_before:,}"],
            ["parameters after", f"{self.params_after:,}"],
            ["parameters added", f"{self.params_added:,} (+{pct:.2f}%)"],
            ["sites changed / found", f"{len(self.rows)} / {self.sites_found}"],
            ["max |Δoutput| at init", check],
        ]
        return tabulate(rows, tablefmt="simple")

    def site_table(self) -> str:
        """A row per inserted module."""
        rows = [
            [r.module, r.kind, r.channels, f"{r.size[0]}x{r.size[1]}", r.attn, r.gate, f"{r.params:,}"]
            for r in self.rows
        ]
        return tabulate(rows, headers=["module", "site", "channels", "size", "attn", "gate", "params"])

    def __str__(self) -> str:
        parts = [self.summary()]
        if self.rows:
            parts.append(self.site_table())
        return "\n\n".join(parts)
