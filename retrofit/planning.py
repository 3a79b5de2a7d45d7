"""The plan: which rule puts which attention on which site, and why the others are left alone.

Rules apply in file order. For each rule, the sites of its kind (``at``) pass these
filters in this order, and the first that drops a site is the reason recorded for it:
``include`` → ``exclude`` → ``min/max_channels`` → ``min/max_size`` → ``stages`` →
``blocks`` → existing attention (``on_existing``) → ``every`` → ``first`` → ``last`` →
``select`` / ``budget`` (by the sites' scores, :func:`retrofit.score_sites`).
A site an earlier rule selected is a conflict, settled
by the later rule's ``conflict`` key (``error`` by default). A ``fallback`` rule applies
only if the model has no site of the kinds the earlier rules target (conv blocks for plain
CNNs without residual adds).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from .attention import get_attention
from .errors import AttentionError, RuleError, first_line
from .options import RetrofitOptions
from .rulefile import Rule, RuleSet
from .sites import Site, SiteAnalysis, SiteRef, SkippedCandidate

if TYPE_CHECKING:
    from .scores import SiteScores

__all__ = ["Placement", "Plan", "make_plan"]


@dataclass(frozen=True)
class Placement:
    """One attention module to insert."""

    site: Site  # where
    rule: Rule  # the rule that selected the site
    attn: str  # registered attention name
    args: Mapping[str, Any]  # constructor arguments (rule args, then caller overrides)
    gate: str  # "identity" or "sigmoid"
    position: str  # "branch", "mid" or "after"
    score: float | None = None  # the site's score (retrofit.score_sites), when scores were given

    @property
    def channels(self) -> int:
        """Channels of the tensor the module sees."""
        mid = self.site.mid_channels if self.position == "mid" else None
        return self.site.channels if mid is None else mid

    @property
    def size(self) -> tuple[int, int]:
        """Spatial size of the tensor the module sees."""
        mid = self.site.mid_size if self.position == "mid" else None
        return self.site.size if mid is None else mid


@dataclass(frozen=True)
class Plan:
    """What a rewrite will do, and why it leaves the rest alone."""

    placements: tuple[Placement, ...]  # in graph order (stacked modules in rule order)
    skipped: tuple[tuple[Site, str], ...]  # sites a rule considered but did not select, with why
    rejected: tuple[SkippedCandidate, ...]  # nodes analysis found unfit to be sites, with why
    notes: tuple[str, ...]  # remarks: unused fallback rules, site kinds no rule targets
    warnings: tuple[str, ...]  # globs that match no site (errors under strict=True)
    rules: RuleSet  # the rules applied

    def table(self) -> str:
        """A text table: every selected, skipped and rejected site with the decision."""
        rows = [[p.site.path or "<root>", p.site.kind, p.channels, f"{p.size[0]}x{p.size[1]}", p.site.stage,
                 f"{p.attn} ({p.position})" + ("" if p.score is None else f", score {p.score:.3g}"), p.rule.source]
                for p in self.placements]
        rows += [[s.path or "<root>", s.kind, s.channels, f"{s.size[0]}x{s.size[1]}", s.stage, "skipped", why]
                 for s, why in self.skipped]
        rows += [[c.qualname, c.kind, "", "", "", "not a site", c.reason] for c in self.rejected]
        text = tabulate(rows, headers=["site", "kind", "channels", "size", "stage", "decision", "rule / reason"])
        extra = [f"note: {n}" for n in self.notes] + [f"warning: {w}" for w in self.warnings]
        return "\n".join([text, *extra])

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (JSON-ready)."""
        return {
            "rules": self.rules.name,
            "selected": [{**p.site.to_dict(), "attn": p.attn, "position": p.position, "gate": p.gate,
                          "rule": p.rule.source, "score": p.score} for p in self.placements],
            "skipped": [{**s.to_dict(), "reason": why} for s, why in self.skipped],
            "rejected": [{"qualname": c.qualname, "kind": c.kind, "reason": c.reason} for c in self.rejected],
            "notes": list(self.notes),
            "warnings": list(self.warnings),
        }


def _matches(path: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def _in(index: int, count: int, wanted: tuple[int, ...]) -> bool:
    return any(index == (w if w >= 0 else count + w) for w in wanted)


def _filter(rule: Rule, site: Site, n_stages: int, stage_sizes: Mapping[int, int], on_existing: str) -> str | None:
    """Why ``rule`` drops ``site`` at one of its per-site filters, or None if it keeps it."""
    if not _matches(site.path, rule.include):
        return f"not matched by include {list(rule.include)}"
    if _matches(site.path, rule.exclude):
        return f"excluded by {list(rule.exclude)}"
    for key, modules in (("output_of", site.output_of), ("input_of", site.input_of)):
        wanted = getattr(rule, key)
        if wanted is not None and not any(_matches(m.rpartition(" (")[2].rstrip(")"), wanted) for m in modules):
            what = "returns" if key == "output_of" else "takes"
            return (f"no module of class {' / '.join(wanted)} {what} its tensor ({key}; it is "
                    f"{'the output' if key == 'output_of' else 'the input'} of {', '.join(modules) or 'no module'})")
    channels = site.mid_channels if rule.position == "mid" and site.mid_channels else site.channels
    if rule.min_channels is not None and channels < rule.min_channels:
        return f"{channels} channels < min_channels = {rule.min_channels}"
    if rule.max_channels is not None and channels > rule.max_channels:
        return f"{channels} channels > max_channels = {rule.max_channels}"
    h, w = site.size
    if rule.min_size is not None and min(h, w) < rule.min_size:
        return f"size {h}x{w} < min_size = {rule.min_size}"
    if rule.max_size is not None and max(h, w) > rule.max_size:
        return f"size {h}x{w} > max_size = {rule.max_size}"
    if rule.stages is not None and not _in(site.stage - 1, n_stages, tuple(s - 1 if s > 0 else s for s in rule.stages)):
        return f"stage {site.stage} of {n_stages} not in stages = {list(rule.stages)}"
    if rule.blocks is not None and not _in(site.block, stage_sizes[site.stage], rule.blocks):
        return f"block {site.block} of stage {site.stage} not in blocks = {list(rule.blocks)}"
    if rule.position == "mid" and site.mid is None:
        return "position 'mid' needs a branch with two or more convolutions; this one has one"
    existing = site.existing_mid if rule.position == "mid" else site.existing
    if existing and on_existing == "skip":
        return f"already has attention here ({existing}); on_existing = \"stack\" adds another"
    return None


def _pick(rule: Rule, sites: list[Site]) -> tuple[list[Site], list[tuple[Site, str]]]:
    """Apply ``every``, ``first`` and ``last`` to the sites that passed the per-site filters."""
    dropped: list[tuple[Site, str]] = []
    if rule.every:
        dropped += [(s, f"every = {rule.every} keeps sites 1, {1 + rule.every}, ...") for i, s in enumerate(sites)
                    if i % rule.every]
        sites = sites[:: rule.every]
    if rule.first is not None:
        dropped += [(s, f"first = {rule.first} keeps the first {rule.first}") for s in sites[rule.first:]]
        sites = sites[: rule.first]
    if rule.last is not None:
        cut = max(len(sites) - rule.last, 0)
        dropped += [(s, f"last = {rule.last} keeps the last {rule.last}") for s in sites[:cut]]
        sites = sites[cut:]
    return sites, dropped


def _by_score(rule: Rule, sites: list[Site], scores: SiteScores | None) -> tuple[list[Site], list[tuple[Site, str]]]:
    """Apply ``select`` (the best-scored ``top``) or ``budget`` (the best-scored sites whose
    costs fit the fraction of the model) to the sites left. Ties keep graph order."""
    if not rule.by_score:
        return sites, []
    if scores is None:
        raise RuleError(f"{rule.source}: select / budget choose sites by score; give scores "
                        "(retrofit.score_sites(model, attn, data), CLI --score-data) or drop them")
    scored = [(s, scores.get(s.qualname, rule.position)) for s in sites]
    dropped = [(s, "no score: not a candidate when the sites were scored") for s, r in scored if r is None]
    # Best first; a NaN score (a module with nothing to score) last.
    ranked = sorted(((s, r) for s, r in scored if r is not None),
                    key=lambda sr: (sr[1].score != sr[1].score, -sr[1].score if sr[1].score == sr[1].score else 0.0))
    n = len(ranked)
    kept: list[Site] = []
    if rule.top is not None:
        for rank, (s, r) in enumerate(ranked, 1):
            if rank <= rule.top:
                kept.append(s)
            else:
                dropped.append((s, f"score {r.score:.3g} ranks {rank} of {n}; select = {{ top = {rule.top} }}"))
    elif rule.budget is not None:
        kind, fraction = rule.budget
        total = scores.model_params if kind == "params" else scores.model_flops
        if not total:
            raise RuleError(f"{rule.source}: budget.{kind} needs the model's {kind}, which the scores lack")
        used = 0
        for rank, (s, r) in enumerate(ranked, 1):
            cost = r.params if kind == "params" else r.flops
            if used + cost <= fraction * total:
                used += cost
                kept.append(s)
            else:
                dropped.append((s, f"score {r.score:.3g} ranks {rank} of {n}; its {cost:,} {kind} would bring the "
                                   f"total to {100 * (used + cost) / total:.3g}% > budget {100 * fraction:g}%"))
    order = {s.ref: i for i, s in enumerate(sites)}
    return sorted(kept, key=lambda s: order[s.ref]), dropped


def _collapsed_stages(rules: RuleSet, analysis: SiteAnalysis) -> list[str]:
    """Stages are told apart by map size; at an input so small that sites of different widths
    all see 1x1 maps, several stages count as one and ``stages`` / ``blocks`` select other
    sites than at the model's usual size. Said once, for the rules that use them."""
    users = [r for r in rules.rules if r.stages is not None or r.blocks is not None]
    out = []
    for kind in sorted({r.at for r in users}):
        tiny = [s for s in analysis.of_kind(kind) if s.size == (1, 1)]
        widths = sorted({s.channels for s in tiny})
        if len(widths) > 1:
            out.append(f"{len(tiny)} {kind} sites of {len(widths)} widths ({', '.join(map(str, widths))} channels) "
                       f"all see 1x1 maps at this input size, so they count as one stage: {users[0].source} selects "
                       "by stages/blocks, which then name other sites than at the model's usual size; use a "
                       "larger input_size")
    return out


def _glob_warnings(rule: Rule, sites: tuple[Site, ...]) -> list[str]:
    out = []
    paths = [s.path for s in sites]
    example = ", ".join(repr(p) for p in dict.fromkeys(paths[:1] + paths[-1:])) or "none"
    for key in ("include", "exclude"):
        globs = getattr(rule, key)
        if key == "include" and globs == ("*",):
            continue
        for g in globs:
            if not any(fnmatch.fnmatchcase(p, g) for p in paths):
                out.append(f"{rule.source}: {key} glob {g!r} matches no {rule.at} site (paths look like {example})")
    return out


def _site_problem(p: Placement) -> str | None:
    """Why the attention type cannot sit at this placement's site (its channels or size break
    a constraint of the type: groups that must divide the channels, a minimum width), or
    None. An attention class declares its constraints in an optional classmethod
    ``site_problem(channels, size, **args) -> str | None``; a site it refuses is skipped with
    that reason in the plan, never an error in the middle of a rewrite."""
    check = getattr(get_attention(p.attn), "site_problem", None)
    if check is None:
        return None
    try:
        why = check(p.channels, p.size, **p.args)
    except TypeError:  # an argument the type does not take: _check_modules names it
        return None
    return None if why is None else f"{p.attn}: {why}"


def _check_modules(placements: tuple[Placement, ...], attn_args: Mapping[str, Any] | None) -> None:
    """Build each distinct module of the plan once on the meta device (no memory, no random
    numbers), so that arguments an attention type rejects are reported with the rule that
    gave them (and the site and channels), before anything is inserted.

    Raises:
        AttentionError: the rule's source, then the attention's own message.
    """
    seen: set[tuple[Any, ...]] = set()
    for p in placements:
        key = (p.attn, p.channels, p.gate, p.site.dtype, tuple(sorted((k, repr(v)) for k, v in p.args.items())))
        if key in seen:
            continue
        seen.add(key)
        cls = get_attention(p.attn)
        try:
            cls(p.channels, gate=p.gate, device="meta", dtype=p.site.dtype, **p.args)
        except (AttentionError, TypeError, ValueError) as e:
            what = first_line(e) if isinstance(e, AttentionError) else f"{p.attn}: {type(e).__name__}: {first_line(e)}"
            extra = f" (with attn_args {dict(attn_args)})" if attn_args else ""
            raise AttentionError(
                f"{p.rule.source}{extra}: {what} (building {p.attn!r} for site {p.site.path or '<root>'!r}, "
                f"{p.channels} channels)"
            ) from e
        except Exception:  # noqa: BLE001
            # A user's type that cannot be built on the meta device (it reads values in
            # __init__): the real build during the rewrite reports anything wrong with it.
            pass


def _select_sites(rule: Rule, of_kind: tuple[Site, ...], on_existing: str,
                  scores: SiteScores | None) -> tuple[list[Site], list[tuple[Site, str]]]:
    """The sites of the rule's kind that it keeps, and the ones it drops with why: its
    per-site filters, then ``every`` / ``first`` / ``last``, then ``select`` / ``budget``."""
    n_stages = max((s.stage for s in of_kind), default=0)
    stage_sizes: dict[int, int] = {}
    for s in of_kind:
        stage_sizes[s.stage] = stage_sizes.get(s.stage, 0) + 1
    kept: list[Site] = []
    dropped: list[tuple[Site, str]] = []
    for site in of_kind:
        why = _filter(rule, site, n_stages, stage_sizes, on_existing)
        if why is None:
            kept.append(site)
        else:
            dropped.append((site, why))
    kept, picked = _pick(rule, kept)
    kept, by_score = _by_score(rule, kept, scores)
    return kept, dropped + picked + by_score


def _claim(claimed: dict[SiteRef, list[Placement]], placement: Placement) -> bool:
    """Add ``placement`` at its site, settling a site an earlier rule claimed by the later
    rule's ``conflict``; False when the earlier module stays alone (``keep``).

    Raises:
        RuleError: ``conflict = "error"`` (the default) and the site is claimed.
    """
    rule, site = placement.rule, placement.site
    earlier = claimed.get(site.ref)
    if earlier:
        if rule.conflict == "error":
            raise RuleError(
                f"{rule.source} and {earlier[0].rule.source} both select site {site.qualname!r}; "
                "narrow one rule's selectors, or say how to combine them with "
                "conflict = \"keep\", \"replace\" or \"stack\" in the later rule"
            )
        if rule.conflict == "keep":
            return False
        if rule.conflict == "replace":
            earlier.clear()
    claimed.setdefault(site.ref, []).append(placement)
    return True


def _unused_fallback(rule: Rule, earlier: set[str], analysis: SiteAnalysis,
                    whole: SiteAnalysis | None) -> tuple[list[str], list[str]] | None:
    """Why a fallback rule is not used, as ``(notes, warnings)``: the model has sites of the
    kinds the earlier rules target (in ``whole`` when given: sites out of reach count, so
    they do not switch the plan to another kind of site). None when it applies."""
    found = sorted(k for k in earlier if (whole or analysis).of_kind(k))
    if not found:
        return None
    if any(analysis.of_kind(k) for k in found):
        return [f"{rule.source} ({rule.at}, fallback) not used: the model has {' and '.join(found)} sites"], []
    out = [s.path or "(top level)" for k in found for s in (whole or analysis).of_kind(k)]
    return [], [f"{rule.source} ({rule.at}, fallback) not used: the model has {' and '.join(found)} sites, but none "
                f"is within reach ({', '.join(out[:4])}{', ...' if len(out) > 4 else ''} are in forward code kept "
                "as Python); nothing is inserted in their place"]


def _untraced_fallback(rule: Rule, earlier: set[str], analysis: SiteAnalysis) -> list[str]:
    """A fallback that applies while parts of the model were not traced, and may hold sites
    of the earlier rules' kinds: said, with where to look."""
    untraced = [p or "(top level)" for p, _ in analysis.left_alone]
    if not (rule.fallback and earlier and untraced):
        return []
    return [f"{rule.source} falls back to {rule.at} sites: no {' or '.join(sorted(earlier))} site was reached, and "
            f"{len(untraced)} part(s) of the model were not traced and may hold some: {', '.join(untraced[:4])}"
            f"{', ...' if len(untraced) > 4 else ''} (report.left_alone says why; leaf_modules or a traceable "
            "forward reach them)"]


def _apply_rule(rule: Rule, of_kind: tuple[Site, ...], options: RetrofitOptions,
                claimed: dict[SiteRef, list[Placement]], skipped: dict[SiteRef, tuple[Site, str]]) -> None:
    """Claim the sites ``rule`` selects among ``of_kind`` (see :func:`_claim`); record why it
    drops the others in ``skipped``, unless an earlier rule claimed them."""
    kept, dropped = _select_sites(rule, of_kind, options.on_existing or rule.on_existing, options.scores)
    for site, why in dropped:
        skipped.setdefault(site.ref, (site, f"{why} ({rule.source})"))
    for site in kept:
        scored = options.scores.get(site.qualname, rule.position) if options.scores is not None else None
        placement = Placement(site=site, rule=rule, attn=rule.attn,
                              args=MappingProxyType({**rule.args, **(options.attn_args or {})}),
                              gate=options.gate or rule.gate, position=rule.position,
                              score=None if scored is None else scored.score)
        unfit = _site_problem(placement)
        if unfit is not None:
            skipped.setdefault(site.ref, (site, f"{unfit} ({rule.source})"))
            continue
        if _claim(claimed, placement):
            skipped.pop(site.ref, None)


def make_plan(
    analysis: SiteAnalysis,
    rules: RuleSet,
    options: RetrofitOptions | None = None,
    whole: SiteAnalysis | None = None,
) -> Plan:
    """Apply ``rules`` to the sites of ``analysis``. Reads only; changes nothing.

    Args:
        analysis: sites from :func:`retrofit.sites.find_sites`.
        rules: the rule set.
        options: the rewrite's options; those a plan reads: ``gate`` and ``on_existing``
            (override every rule's), ``attn_args`` (override the rules' ``args``), ``strict``
            (a glob that matches no site is an error), ``scores`` (for rules that select by
            score: ``select``, ``budget``; each placement then carries its site's score).
        whole: every site of the model, those out of reach included (``keep_class``):
            whether a fallback rule applies is decided on these, so sites that exist but
            cannot be reached do not switch the plan to another kind of site.

    Raises:
        RuleError: two rules select one site and the later says ``conflict = "error"``, or
            (under ``strict``) a glob matches no site.
        AttentionError: an attention type rejects its arguments at a selected site (the
            message names the rule, the site and the channels).
    """
    options = options or RetrofitOptions()
    claimed: dict[SiteRef, list[Placement]] = {}
    skipped: dict[SiteRef, tuple[Site, str]] = {}
    notes: list[str] = []
    warns: list[str] = []
    reach: list[str] = []
    for i, rule in enumerate(rules.rules):
        of_kind = analysis.of_kind(rule.at)
        warns += _glob_warnings(rule, of_kind)
        earlier = {r.at for r in rules.rules[:i] if not r.fallback}
        unused = _unused_fallback(rule, earlier, analysis, whole) if rule.fallback else None
        if unused is not None:
            notes += unused[0]
            reach += unused[1]
            continue
        reach += _untraced_fallback(rule, earlier, analysis)
        _apply_rule(rule, of_kind, options, claimed, skipped)
    warns += _collapsed_stages(rules, analysis)
    for kind in sorted({s.kind for s in analysis.sites} - {r.at for r in rules.rules}):
        notes.append(f"{len(analysis.of_kind(kind))} {kind} sites: no rule targets {kind} sites")
    if options.strict and warns:
        raise RuleError(warns[0] + "; fix the glob or drop strict")
    warns += reach
    for w in warns:
        warnings.warn(w, stacklevel=3)
    order = {s.ref: i for i, s in enumerate(analysis.sites)}
    placements = tuple(p for ref in sorted(claimed, key=order.__getitem__) for p in claimed[ref])
    _check_modules(placements, options.attn_args)
    left = tuple(sorted((v for k, v in skipped.items() if not claimed.get(k)), key=lambda v: order[v[0].ref]))
    return Plan(placements, left, analysis.skipped, tuple(notes), tuple(warns), rules)
