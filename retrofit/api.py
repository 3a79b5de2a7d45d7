"""The public entry point: ``retrofit(model, attn="se")``."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import SiteError
from .frameworks import framework_of
from .leaves import check_leaf_modules
from .meta import REPORT_KEY, retrofit_meta
from .options import LeafSpec, RetrofitOptions
from .partition import Partition, partition, refine, slim
from .planning import Plan, make_plan
from .recipe import attach_recipe, recipe_of_result
from .report import Report, SiteRow, StageRow, get_report
from .rewrite import rewrite
from .rulefile import RuleSet, resolve_rules
from .shapes import resolve_input_size
from .sites import SiteAnalysis, holds_conv
from .verify import Reference, compare_to, count_params, reference_run

__all__ = ["retrofit", "retrofit_with", "analyze", "plan", "get_report", "NothingSelectedWarning"]

_log = logging.getLogger("retrofit")


class NothingSelectedWarning(UserWarning):
    """The rules selected no site of the model, so nothing was inserted. A caller for whom
    that is normal (a trainer that logs it instead) filters this category."""


@dataclass(frozen=True)
class _Before:
    """The model as it was before the rewrite, measured before anything changes: an
    in-place rewrite (``inplace``, the Ultralytics trainer) changes the model itself."""

    params: int  # parameters of the input model
    prefixes: tuple[str, ...]  # the stages the per-stage diff is keyed by
    stages: dict[str, int]  # parameters per stage
    reference: Reference | None  # its output on the probe input (verify), else None

    @classmethod
    def of(cls, model: nn.Module, size: tuple[int, int, int], verify: bool) -> _Before:
        prefixes = _stage_prefixes(model)
        return cls(params=count_params(model), prefixes=prefixes, stages=_per_stage(model, prefixes),
                   reference=reference_run(model, size) if verify else None)


def _stage_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The parts of the model the per-stage diff counts: its library's stages (a YOLO
    model's layers), timm's feature stages, else top-level modules."""
    framework = framework_of(model)
    declared = None if framework is None else framework.stages(model)
    prefixes = [name for name, _ in model.named_children()] + (declared or [])
    modules = dict(model.named_modules())
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):
        for f in info:
            path = f.get("module", "") if isinstance(f, dict) else ""
            parent = path.rpartition(".")[0]
            # timm lists only the stages where resolution changes ("blocks.1", "blocks.2",
            # "blocks.4"); their siblings ("blocks.3") are stages too. Some models' lists
            # name modules they do not have (timm's Twins: "block.0"); those are left out.
            if parent in modules and parent:
                prefixes += [f"{parent}.{name}" for name, _ in modules[parent].named_children()]
            elif path in modules and path:
                prefixes.append(path)
    return tuple(prefixes)


def _stage_of(name: str, prefixes: tuple[str, ...]) -> str:
    best = ""
    for p in prefixes:
        if (name == p or name.startswith(p + ".")) and len(p) > len(best):
            best = p
    return best or name.split(".", 1)[0]


def _per_stage(model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = _stage_of(name, prefixes)
        counts[key] = counts.get(key, 0) + p.numel()
    return counts


def _stage_rows(before: _Before, result: nn.Module) -> tuple[StageRow, ...]:
    """Parameters per stage before and after."""
    after = _per_stage(result, before.prefixes)
    order = list(dict.fromkeys([*before.stages, *after]))
    return tuple(StageRow(k, before.stages.get(k, 0), after.get(k, 0)) for k in order)


def _copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, with tensors that modules keep outside their parameters and
    buffers and that carry autograd history copied detached. Such tensors are caches (timm's
    TinyViT and EfficientFormer keep attention biases computed by an eval forward), and
    ``deepcopy`` refuses a tensor that is not a graph leaf: without this, a model that had
    run one eval forward with autograd on could not be retrofitted."""
    memo: dict[int, Any] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach().clone()
        elif isinstance(value, Mapping):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for module in model.modules():
        for key, value in vars(module).items():
            if key not in ("_parameters", "_buffers", "_modules"):
                visit(value)
    return copy.deepcopy(model, memo)


def _partition(
    model: nn.Module,
    options: RetrofitOptions,
    rules: RuleSet | None = None,
) -> tuple[tuple[int, int, int], Partition]:
    check_leaf_modules(model, options.leaf_modules)
    size = resolve_input_size(model, options.input_size)
    # Rules that select sites by the modules around them need a probe forward's data flow.
    flow = rules is not None and any(r.output_of is not None or r.input_of is not None for r in rules.rules)
    parts = partition(model, size, options.leaf_modules, options.keep_class, flow)
    if parts.root_error is not None and not parts.analysis.sites and holds_conv(model):
        # Nothing with sites traced: the trace failure is what hides them. A model with no
        # convolution at all has no sites however it traces; "no sites" is then the answer.
        raise parts.root_error
    return size, parts


def analyze(
    model: nn.Module,
    input_size: int | tuple[int, ...] | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    keep_class: bool = False,
) -> SiteAnalysis:
    """Find the sites of ``model`` without changing anything.

    Args:
        model: any ``nn.Module``; one torch.fx cannot trace as a whole is analysed in its
            largest traceable submodules (see :func:`retrofit`).
        input_size: ``(C, H, W)``, ``(H, W)`` or an int; default from timm's pretrained
            config, else 224x224.
        leaf_modules: modules not to trace into (classes, class names or module paths).
        keep_class: analyse as :func:`retrofit` with ``keep_class=True`` would see it.

    Returns:
        The sites, the candidates that are not sites, and what no trace reached
        (``left_alone``: module paths with the reason; ``""`` is the top-level forward).
    """
    options = RetrofitOptions(input_size=input_size, leaf_modules=tuple(leaf_modules), keep_class=keep_class)
    return _partition(model, options)[1].analysis


def plan(
    model: nn.Module,
    attn: str | None = "se",
    *,
    rules: str | Path | RuleSet | None = None,
    options: RetrofitOptions | None = None,
    **overrides: Any,
) -> Plan:
    """What :func:`retrofit` would insert, and why it leaves the other sites alone.

    Arguments are those of :func:`retrofit`; nothing is changed.
    """
    ruleset = resolve_rules(attn, rules)
    options = RetrofitOptions.of(options, **overrides)
    parts = _partition(model, options, ruleset)[1]
    return make_plan(parts.analysis, ruleset, options, parts.whole_analysis)


def retrofit(
    model: nn.Module,
    attn: str | None = "se",
    *,
    rules: str | Path | RuleSet | None = None,
    options: RetrofitOptions | None = None,
    inplace: bool = False,
    verify: bool = True,
    check_identity: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Insert attention into a trained CNN, starting as an exact identity.

    The model is traced with torch.fx; residual adds and conv blocks are found; the rules
    (a built-in set named by ``attn``, or a rule file) choose the sites; one attention
    module is inserted per site. With identity gates (the default) the result computes
    exactly what the model computed; fine-tuning then trains the gates.

    A model that torch.fx cannot trace as a whole (data-dependent control flow, a forward
    that loops over its layers in Python as YOLO's does) is retrofitted in its blocks that
    do trace: each one that receives attention is replaced, in place, by its rewritten
    graph; the result is the model's own class, and the report lists what was left alone
    and why (``report.left_alone``). The same path runs on request with
    ``keep_class=True``, for code that needs the model's methods (``forward_features``,
    ``reset_classifier``); sites in the top-level forward itself are then out of reach,
    and the report says how many. Modules that hold no insertion point stay called
    submodules in both forms (``report.inlined`` lists the ones traced into).

    Args:
        model: a timm, torchvision, Ultralytics, transformers, smp or user ``nn.Module``.
            It is not modified.
        attn: built-in rule set (``"se"``, ``"eca"``, ``"cbam"``, ...) when ``rules`` is None.
        rules: a rule file path or a :class:`~retrofit.rulefile.RuleSet`.
        options: the rewrite's options as one record (:class:`RetrofitOptions`, where each
            is documented: the gate form, attention arguments, input size, leaf modules,
            fusing, ...); default every option's default.
        inplace: trace ``model`` itself instead of a deep copy; the result then shares
            parameters with ``model``.
        verify: run the original and the result on a probe input and record the largest
            output difference in the report.
        check_identity: refuse an identity-gate module that does not return its input
            exactly on a probe before inserting it (user types); ``False`` opts out.
        overrides: options by name, over ``options`` (``gate="sigmoid"``, ``fuse=False``,
            ``attn_args={"rd_ratio": 0.25}``, ...).

    Returns:
        A ``torch.fx.GraphModule``; on the partial path (``keep_class``, or a model that
        does not trace as a whole) the model's own class with traced submodules.
        ``retrofit.get_report(result)`` returns its :class:`Report`.

    Raises:
        TraceError: no part of the model with sites traces (the message names the module
            and line of the whole-model failure).
        RuleError: the rules are invalid or ``attn`` names no built-in rule set.
        SiteError: the model has no residual adds and no conv blocks.
        OptionError: an option is unknown, or its value is not valid (``gate``, ``on_existing``).

    Example:
        >>> model = timm.create_model("resnet50")
        >>> gm = retrofit(model, attn="cbam")
        >>> print(get_report(gm))
    """
    return retrofit_with(model, resolve_rules(attn, rules), RetrofitOptions.of(options, **overrides), inplace=inplace,
                         verify=verify, check_identity=check_identity, stacklevel=3)


def retrofit_with(model: nn.Module, ruleset: RuleSet, options: RetrofitOptions, *, inplace: bool = False,
                  verify: bool = True, check_identity: bool = True, stacklevel: int = 2) -> nn.Module:
    """:func:`retrofit` with the rules and options as records (what a recipe holds)."""
    work = model if inplace else _copy_model(model)
    size, parts = _partition(work, options, ruleset)
    if not parts.analysis.sites:
        raise _no_sites(model, size, parts)
    the_plan = make_plan(parts.analysis, ruleset, options, parts.whole_analysis)
    before = _Before.of(work, size, verify)  # before the rewrite, which changes `work` in place on the partial path
    if not the_plan.placements:
        warnings.warn(f"rules {ruleset.name!r} selected no site of {type(model).__name__}; nothing inserted",
                      NothingSelectedWarning, stacklevel=stacklevel)
    parts, the_plan = _in_reach(work, parts, the_plan)
    parts, inlined = slim(work, parts, [(p.site, p.position) for p in the_plan.placements], size)
    result, inserted = rewrite(work, parts, the_plan.placements, options.fuse, check_identity)
    notes = list(parts.notes)
    traced = sorted({parts.local(i.placement.site)[0].path for i in inserted} - {""})
    framework = framework_of(model)
    if parts.root_error is not None and framework is not None and framework.traces_in_parts:
        # The normal path for this library's models: one short line at the INFO level (the
        # details are in report.left_alone), no warning.
        _log.info("%s: attention in %d traced submodule(s); the model's own forward stays Python (as expected)",
                  type(model).__name__, len(traced))
    elif parts.root_error is not None:
        msg = (f"{type(model).__name__} does not trace as a whole; attention went into {len(traced)} traced "
               f"submodule(s) and {len(parts.left_alone)} part(s) were left alone (report.left_alone). "
               f"First failure: {parts.root_error.where}")
        notes.append(msg)
        warnings.warn(msg, stacklevel=stacklevel)
    missed = _out_of_reach(parts, ruleset, options, the_plan)
    if missed:
        notes.append(f"keep_class: {len(missed)} site(s) the rules select are in forward code kept as "
                     f"Python, out of reach: {', '.join(missed[:4])}{', ...' if len(missed) > 4 else ''}")
    comparison = None if before.reference is None else compare_to(before.reference, result)
    report = _report(model, result, size, parts, the_plan, inserted, before, comparison, notes, traced, missed,
                     inlined)
    retrofit_meta(result, create=True)[REPORT_KEY] = report
    recipe = recipe_of_result(model, ruleset.doc, ruleset.name, options.replace(input_size=size))
    attach_recipe(result, recipe)
    if framework is not None:
        framework.on_result(result, recipe)
    return result


def _no_sites(model: nn.Module, size: tuple[int, int, int], parts: Partition) -> SiteError:
    # _partition returns a trace error beside no sites only for a model with no convolution.
    untraced = ("" if parts.root_error is None else
                f"; it also does not trace as a whole ({parts.root_error.where}),"
                " but it holds no convolution, so no part of it could hold a site")
    return SiteError(
        f"{type(model).__name__} has no residual adds and no conv blocks for attention "
        f"(input size {size}); is it a CNN? Leaf modules hide what is inside them{untraced}"
    )


def _in_reach(model: nn.Module, parts: Partition, the_plan: Plan) -> tuple[Partition, Plan]:
    """The partition narrowed to the planned sites, and the plan without the ones out of
    reach (a site whose module traces only as part of the model's own forward, which
    keep_class leaves as Python code)."""
    parts, unreachable = refine(model, parts, [p.site for p in the_plan.placements])
    if not unreachable:
        return parts, the_plan
    lost = {s.ref for s in unreachable}
    why = "its module traces only as part of the model's forward, which keep_class keeps as Python code"
    return parts, dc_replace(the_plan, placements=tuple(p for p in the_plan.placements if p.site.ref not in lost),
                             skipped=the_plan.skipped + tuple((s, why) for s in unreachable))


def _report(model: nn.Module, result: nn.Module, size: tuple[int, int, int], parts: Partition, the_plan: Plan,
            inserted: tuple[Any, ...], before: _Before, comparison: Any, notes: list[str], traced: list[str],
            missed: list[str], inlined: tuple[tuple[str, str], ...]) -> Report:
    rows = tuple(
        SiteRow(path=i.placement.site.path, kind=i.placement.site.kind, channels=i.placement.channels,
                size=i.placement.size, attn=i.placement.attn, gate=i.placement.gate, position=i.placement.position,
                module=i.name, params=i.params, stage=i.placement.site.stage, qualname=i.placement.site.qualname)
        for i in inserted
    )
    return Report(
        model=type(model).__name__, input_size=size, rows=rows, sites_found=len(parts.analysis.sites),
        skipped=tuple((s.path, why) for s, why in the_plan.skipped), params_before=before.params,
        params_after=count_params(result), max_abs_diff=None if comparison is None else comparison.max_abs_diff,
        identity_expected=all(i.placement.gate == "identity" for i in inserted), notes=the_plan.notes,
        warnings=the_plan.warnings + tuple(notes),
        flops_before=None if comparison is None else comparison.flops_before,
        flops_after=None if comparison is None else comparison.flops_after, stages=_stage_rows(before, result),
        left_alone=parts.left_alone, traced=tuple(traced), out_of_reach=tuple(missed), inlined=inlined,
    )


def _out_of_reach(parts: Partition, ruleset: RuleSet, options: RetrofitOptions, the_plan: Plan) -> list[str]:
    """Sites the rules select in the whole model that the units do not reach (keep_class)."""
    if parts.root_error is not None or parts.whole_analysis is None:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = make_plan(parts.whole_analysis, ruleset, options.replace(strict=False)).placements
    got = {(p.site.path, p.position) for p in the_plan.placements}
    return [p.site.path or "(top level)" for p in want if (p.site.path, p.position) not in got]
