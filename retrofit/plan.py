"""The plan: which rule puts which attention on which site, and why the others are left alone.

Rules apply in file order. A rule selects the sites of its kind whose path matches one of
its ``include`` globs and none of its ``exclude`` globs; a ``fallback`` rule applies only
if no earlier rule selected anything. Two rules selecting the same site is an error.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from tabulate import tabulate

from .errors import RuleError
from .rulefile import Rule, RuleSet
from .sites import Site, SiteAnalysis

__all__ = ["Placement", "Plan", "make_plan"]


@dataclass(frozen=True)
class Placement:
    """One attention module to insert."""

    site: Site  # where
    rule: Rule  # the rule that selected the site
    attn: str  # registered attention name
    args: Mapping[str, Any]  # constructor arguments (rule args, then caller overrides)
    gate: str  # "identity" or "sigmoid"
    position: str  # "branch" or "after"


@dataclass(frozen=True)
class Plan:
    """What a rewrite will do."""

    placements: tuple[Placement, ...]  # in graph order
    skipped: tuple[tuple[Site, str], ...]  # sites a rule looked at but did not select, with why
    notes: tuple[str, ...]  # rule-level remarks (an unused fallback rule, ...)
    rules: RuleSet  # the rules applied

    def table(self) -> str:
        """A text table of selected and skipped sites."""
        rows = [[p.site.path or "<root>", p.site.kind, p.site.channels, p.attn, p.position, "selected"]
                for p in self.placements]
        rows += [[s.path or "<root>", s.kind, s.channels, "", "", f"skipped: {why}"] for s, why in self.skipped]
        return tabulate(rows, headers=["site", "kind", "channels", "attn", "position", "decision"])


def _matches(path: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def make_plan(
    analysis: SiteAnalysis,
    rules: RuleSet,
    gate: str | None = None,
    attn_args: Mapping[str, Any] | None = None,
) -> Plan:
    """Apply ``rules`` to the sites of ``analysis``.

    Args:
        analysis: sites from :func:`retrofit.sites.find_sites`.
        rules: the rule set.
        gate: overrides every rule's gate form when given.
        attn_args: constructor arguments that override the rules' ``args``.

    Raises:
        RuleError: two rules select the same site.
    """
    claimed: dict[str, Placement] = {}
    skipped: dict[str, tuple[Site, str]] = {}
    notes: list[str] = []
    for rule in rules.rules:
        if rule.fallback and claimed:
            notes.append(f"{rule.source} ({rule.at}, fallback) not used: earlier rules selected {len(claimed)} sites")
            continue
        for site in analysis.of_kind(rule.at):
            if not _matches(site.path, rule.include):
                skipped.setdefault(site.node, (site, f"not matched by include {list(rule.include)} ({rule.source})"))
                continue
            if _matches(site.path, rule.exclude):
                skipped.setdefault(site.node, (site, f"excluded by {list(rule.exclude)} ({rule.source})"))
                continue
            if site.node in claimed:
                raise RuleError(
                    f"{rule.source} and {claimed[site.node].rule.source} both select site {site.qualname!r}; "
                    "narrow one rule's include/exclude globs"
                )
            claimed[site.node] = Placement(
                site=site,
                rule=rule,
                attn=rule.attn,
                args=MappingProxyType({**rule.args, **(attn_args or {})}),
                gate=gate or rule.gate,
                position=rule.position,
            )
            skipped.pop(site.node, None)
    order = {s.node: i for i, s in enumerate(analysis.sites)}
    placements = tuple(sorted(claimed.values(), key=lambda p: order[p.site.node]))
    left = tuple(sorted((v for k, v in skipped.items() if k not in claimed), key=lambda v: order[v[0].node]))
    return Plan(placements, left, tuple(notes), rules)
