"""The public entry point: ``retrofit(model, attn="se")``."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch.fx
from torch import nn

from .attention import GATES
from .errors import OptionError, SiteError
from .plan import Plan, make_plan
from .report import Report, SiteRow, StageRow
from .rewrite import insert_attention
from .rulefile import ON_EXISTING, RuleSet, resolve_rules
from .shapes import propagate_shapes, resolve_input_size
from .sites import SiteAnalysis, find_sites
from .trace import LeafSpec, trace
from .verify import compare, count_params

__all__ = ["retrofit", "analyze", "plan", "get_report"]

_REPORT_KEY = "retrofit_report"
RECIPE_KEY = "retrofit_recipe"


def _stage_of(name: str, prefixes: list[str]) -> str:
    best = ""
    for p in prefixes:
        if (name == p or name.startswith(p + ".")) and len(p) > len(best):
            best = p
    return best or name.split(".", 1)[0]


def _stage_rows(model: nn.Module, gm: torch.fx.GraphModule) -> tuple[StageRow, ...]:
    """Parameters per part of the model: timm's feature stages, else top-level modules."""
    prefixes = [name for name, _ in model.named_children()]
    info = getattr(model, "feature_info", None)
    if isinstance(info, list):
        for f in info:
            path = f.get("module", "") if isinstance(f, dict) else ""
            parent = path.rpartition(".")[0]
            # timm lists only the stages where resolution changes ("blocks.1", "blocks.2",
            # "blocks.4"); their siblings ("blocks.3") are stages too.
            if parent:
                prefixes += [f"{parent}.{name}" for name, _ in model.get_submodule(parent).named_children()]
            elif path:
                prefixes.append(path)
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = _stage_of(name, prefixes)
        before[key] = before.get(key, 0) + p.numel()
    for name, p in gm.named_parameters():
        key = _stage_of(name, prefixes)
        after[key] = after.get(key, 0) + p.numel()
    order = list(dict.fromkeys([*before, *after]))
    return tuple(StageRow(k, before.get(k, 0), after.get(k, 0)) for k in order)


def _check_choice(name: str, value: str | None, valid: tuple[str, ...]) -> None:
    if value is not None and value not in valid:
        raise OptionError(f"{name}={value!r} is not valid (valid: {', '.join(valid)})")


def _leaf_name(leaf: LeafSpec) -> str:
    return leaf if isinstance(leaf, str) else f"{leaf.__module__}:{leaf.__qualname__}"


def _prepare(
    model: nn.Module,
    input_size: int | tuple[int, ...] | None,
    leaf_modules: Iterable[LeafSpec],
) -> tuple[torch.fx.GraphModule, tuple[int, int, int], SiteAnalysis]:
    gm = trace(model, leaf_modules)
    size = resolve_input_size(model, input_size)
    return gm, size, find_sites(gm, propagate_shapes(gm, size))


def analyze(
    model: nn.Module,
    input_size: int | tuple[int, ...] | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
) -> SiteAnalysis:
    """Find the sites of ``model`` without changing anything.

    Args:
        model: any ``nn.Module`` torch.fx can trace.
        input_size: ``(C, H, W)``, ``(H, W)`` or an int; default from timm's pretrained
            config, else 224x224.
        leaf_modules: modules not to trace into (classes, class names or module paths).
    """
    return _prepare(model, input_size, leaf_modules)[2]


def plan(
    model: nn.Module,
    attn: str | None = "se",
    *,
    rules: str | Path | RuleSet | None = None,
    gate: str | None = None,
    attn_args: Mapping[str, Any] | None = None,
    input_size: int | tuple[int, ...] | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    strict: bool = False,
    on_existing: str | None = None,
) -> Plan:
    """What :func:`retrofit` would insert, and why it leaves the other sites alone.

    Arguments are those of :func:`retrofit`; nothing is changed.
    """
    ruleset = resolve_rules(attn, rules)
    _check_choice("on_existing", on_existing, ON_EXISTING)
    return make_plan(analyze(model, input_size, leaf_modules), ruleset, gate, attn_args, strict, on_existing)


def retrofit(
    model: nn.Module,
    attn: str | None = "se",
    *,
    rules: str | Path | RuleSet | None = None,
    gate: str | None = None,
    attn_args: Mapping[str, Any] | None = None,
    input_size: int | tuple[int, ...] | None = None,
    leaf_modules: Iterable[LeafSpec] = (),
    inplace: bool = False,
    verify: bool = True,
    strict: bool = False,
    on_existing: str | None = None,
    fuse: bool = True,
    check_identity: bool = True,
) -> torch.fx.GraphModule:
    """Insert attention into a trained CNN, starting as an exact identity.

    The model is traced with torch.fx; residual adds and conv blocks are found; the rules
    (a built-in set named by ``attn``, or a rule file) choose the sites; one attention
    module is inserted per site. With identity gates (the default) the result computes
    exactly what the model computed; fine-tuning then trains the gates.

    Args:
        model: a timm, torchvision or user ``nn.Module``. It is not modified.
        attn: built-in rule set (``"se"``, ``"eca"``, ``"cbam"``) when ``rules`` is None.
        rules: a rule file path or a :class:`~retrofit.rulefile.RuleSet`.
        gate: ``"identity"`` or ``"sigmoid"``; overrides the rules' gate when given.
        attn_args: attention constructor arguments that override the rules' ``args``
            (e.g. ``{"rd_ratio": 0.25}``).
        input_size: ``(C, H, W)``, ``(H, W)`` or an int, for shapes and the check; default
            from timm's ``pretrained_cfg``, else 224x224.
        leaf_modules: modules not to trace into (classes, class names or module paths).
        inplace: trace ``model`` itself instead of a deep copy; the result then shares
            parameters with ``model``.
        verify: run the original and the result on a probe input and record the largest
            output difference in the report.
        strict: a rule glob that matches no site is an error (default: a warning, kept
            in the report).
        on_existing: where the model already has attention (timm's ``seresnet50``, the
            SE inside EfficientNet blocks, an earlier retrofit): ``"skip"`` (the rules'
            default) leaves the site alone and says so in the plan; ``"stack"`` adds another.
        fuse: a gating module (SE, ECA, CBAM) right before an out-of-place residual add
            computes only its gate, and one ``torch.addcmul`` does its multiply and the add
            (same outputs, one less pass over the activation); ``False`` calls the module.
        check_identity: refuse an identity-gate module that does not return its input
            exactly on a probe before inserting it (user types); ``False`` opts out.

    Returns:
        A ``torch.fx.GraphModule``. ``retrofit.get_report(gm)`` returns its :class:`Report`.

    Raises:
        TraceError: the model does not trace (the message names the module and line).
        RuleError: the rules are invalid or ``attn`` names no built-in rule set.
        SiteError: the model has no residual adds and no conv blocks.

    Example:
        >>> model = timm.create_model("resnet50")
        >>> gm = retrofit(model, attn="cbam")
        >>> print(get_report(gm))
    """
    _check_choice("gate", gate, GATES)
    _check_choice("on_existing", on_existing, ON_EXISTING)
    ruleset = resolve_rules(attn, rules)
    leaf_modules = tuple(leaf_modules)
    work = model if inplace else copy.deepcopy(model)
    gm, size, analysis = _prepare(work, input_size, leaf_modules)
    if not analysis.sites:
        raise SiteError(
            f"{type(model).__name__} has no residual adds and no conv blocks for attention "
            f"(input size {size}); is it a CNN? Leaf modules hide what is inside them"
        )
    the_plan = make_plan(analysis, ruleset, gate, attn_args, strict, on_existing)
    if not the_plan.placements:
        warnings.warn(f"rules {ruleset.name!r} selected no site of {type(model).__name__}; nothing inserted",
                      stacklevel=2)
    inserted = insert_attention(gm, the_plan.placements, fuse=fuse, check_identity=check_identity)
    comparison = compare(model, gm, size) if verify else None
    report = Report(
        model=type(model).__name__,
        input_size=size,
        rows=tuple(
            SiteRow(
                path=i.placement.site.path,
                kind=i.placement.site.kind,
                channels=i.placement.channels,
                size=i.placement.size,
                attn=i.placement.attn,
                gate=i.placement.gate,
                position=i.placement.position,
                module=i.name,
                params=i.params,
            )
            for i in inserted
        ),
        sites_found=len(analysis.sites),
        skipped=tuple((s.path, why) for s, why in the_plan.skipped),
        params_before=count_params(model),
        params_after=count_params(gm),
        max_abs_diff=None if comparison is None else comparison.max_abs_diff,
        identity_expected=all(i.placement.gate == "identity" for i in inserted),
        notes=the_plan.notes,
        warnings=the_plan.warnings + tuple(gm.meta.get("retrofit_trace_notes", ())),
        flops_before=None if comparison is None else comparison.flops_before,
        flops_after=None if comparison is None else comparison.flops_after,
        stages=_stage_rows(model, gm),
    )
    gm.meta[_REPORT_KEY] = report
    # What `retrofit.save` needs to rebuild this exact graph: plain data, no code.
    gm.meta[RECIPE_KEY] = {
        "rules": {"name": ruleset.name, "doc": _plain(ruleset.doc)},
        "gate": gate,
        "on_existing": on_existing,
        "fuse": fuse,
        "attn_args": dict(attn_args or {}),
        "input_size": list(size),
        "leaf_modules": [_leaf_name(m) for m in leaf_modules],
    }
    return gm


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def get_report(gm: torch.fx.GraphModule) -> Report:
    """The :class:`Report` of a model returned by :func:`retrofit`.

    Raises:
        ValueError: ``gm`` did not come from :func:`retrofit`.
    """
    report = getattr(gm, "meta", {}).get(_REPORT_KEY)
    if report is None:
        raise ValueError(f"{type(gm).__name__} carries no retrofit report; it did not come from retrofit()")
    return report
