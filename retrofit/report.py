"""The report of one rewrite: a row per inserted module, totals, and the identity check."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tabulate import tabulate
from torch import nn

from .meta import REPORT_KEY, retrofit_meta

__all__ = ["SiteRow", "StageRow", "Report", "get_report", "report_of"]


@dataclass(frozen=True)
class StageRow:
    """Parameters of one part of the model (a timm feature stage or a top-level module)."""

    name: str  # module path prefix ("layer3", "blocks.4", "fc")
    params_before: int  # parameters under it in the input model
    params_after: int  # parameters under it in the result

    @property
    def params_added(self) -> int:
        return self.params_after - self.params_before

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params_before": self.params_before, "params_after": self.params_after,
                "params_added": self.params_added}


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
    stage: int = 0  # the site's 1-based stage (as rules number them)
    qualname: str = ""  # the site's node ("layer3.2.add"): unique where a module holds two sites

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
            "stage": self.stage,
            "qualname": self.qualname,
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
    warnings: tuple[str, ...] = ()  # rule globs that matched no site
    flops_before: int | None = None  # FLOPs per sample of the input model (None if not run)
    flops_after: int | None = None  # FLOPs per sample of the result
    stages: tuple[StageRow, ...] = ()  # parameters per stage / top-level module
    left_alone: tuple[tuple[str, str], ...] = ()  # partial path: (module path, why it was not traced)
    inlined: tuple[tuple[str, str], ...] = ()  # (module path, why): modules whose forward became graph code
    traced: tuple[str, ...] = ()  # partial path: submodules replaced by their rewritten GraphModule
    # keep_class: paths of sites the rules select in the whole model that sit in forward
    # code kept as Python, so no attention went there (also named in ``warnings``)
    out_of_reach: tuple[str, ...] = ()

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
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "sites_found": self.sites_found,
            "sites_changed": len(self.rows),
            "sites_skipped": len(self.skipped),
            "max_abs_diff": self.max_abs_diff,
            "identity_expected": self.identity_expected,
            "stages": [r.to_dict() for r in self.stages],
            "sites": [r.to_dict() for r in self.rows],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "traced": list(self.traced),
            "left_alone": [{"path": p, "reason": r} for p, r in self.left_alone],
            "out_of_reach": list(self.out_of_reach),
            "inlined": [{"path": p, "reason": r} for p, r in self.inlined],
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
        ]
        if self.flops_before is not None and self.flops_after is not None:
            fpct = 100.0 * (self.flops_after - self.flops_before) / self.flops_before if self.flops_before else 0.0
            rows += [
                ["FLOPs before", _giga(self.flops_before)],
                ["FLOPs after", f"{_giga(self.flops_after)} (+{fpct:.2f}%)"],
            ]
        rows += [
            ["sites changed / skipped / found", f"{len(self.rows)} / {len(self.skipped)} / {self.sites_found}"],
            ["max |Δoutput| at init", check],
        ]
        return tabulate(rows, tablefmt="simple")

    def stage_table(self) -> str:
        """Parameters before / after / added per stage, and the total."""
        rows = [[s.name, f"{s.params_before:,}", f"{s.params_after:,}", f"{s.params_added:,}", _pct(s)]
                for s in self.stages]
        total = StageRow("total", self.params_before, self.params_after)
        rows.append([total.name, f"{total.params_before:,}", f"{total.params_after:,}", f"{total.params_added:,}",
                     _pct(total)])
        return tabulate(rows, headers=["stage", "params before", "params after", "added", "added %"],
                        colalign=("left", "right", "right", "right", "right"))

    def site_table(self) -> str:
        """A row per inserted module."""
        rows = [
            [r.module, r.kind, r.channels, f"{r.size[0]}x{r.size[1]}", r.attn, r.gate, f"{r.params:,}"]
            for r in self.rows
        ]
        return tabulate(rows, headers=["module", "site", "channels", "size", "attn", "gate", "params"])

    def reach_lines(self) -> list[str]:
        """What was rewritten in place and what was left alone, one line per reason: the
        modules that failed alike (YOLO's C2f blocks) share a line, paths in files are
        shortened to the file's name, and the advice after the reason is left to
        ``left_alone`` (which has every module's whole reason)."""
        if not (self.traced or self.left_alone):
            return []
        lines = ["rewritten in place: " + (", ".join(self.traced) or "nothing")]
        grouped: dict[str, list[str]] = {}
        for path, why in self.left_alone:
            short = re.sub(r"(?:/[^\s:`]+)*/([^/\s:`]+\.py):", r"\1:", why.split(". torch.fx cannot", 1)[0])
            short = re.sub(r"^cannot trace \w+: (the top-level forward of|module '[^']*' \()", r"\1", short)
            grouped.setdefault(short, []).append(path or "(top level)")
        for why, paths in grouped.items():
            shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
            lines.append(f"left alone: {shown}: {why}")
        return lines

    def __str__(self) -> str:
        parts = [self.summary()]
        if self.stages:
            parts.append(self.stage_table())
        if self.rows:
            parts.append(self.site_table())
        if self.traced or self.left_alone:
            parts.append("\n".join(self.reach_lines()))
        parts += [f"warning: {w}" for w in self.warnings]
        return "\n\n".join(parts)


def _giga(flops: int) -> str:
    return f"{flops / 1e9:.3f} G"


def _pct(row: StageRow) -> str:
    return f"+{100.0 * row.params_added / row.params_before:.2f}%" if row.params_before else "new"


def report_of(model: nn.Module) -> Report | None:
    """The :class:`Report` a model carries (from :func:`retrofit.retrofit`), or None."""
    report = retrofit_meta(model).get(REPORT_KEY)
    return report if isinstance(report, Report) else None


def get_report(gm: nn.Module) -> Report:
    """The :class:`Report` of a model returned by :func:`retrofit.retrofit`.

    Raises:
        ValueError: ``gm`` did not come from :func:`retrofit.retrofit` (a model built by
            :func:`retrofit.create_model` or loaded by :func:`retrofit.load` carries none).
    """
    report = report_of(gm)
    if report is None:
        raise ValueError(f"{type(gm).__name__} carries no retrofit report; it did not come from retrofit()")
    return report
