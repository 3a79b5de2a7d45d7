"""The trainer :func:`retrofit.ultralytics.trainer` returns (its public path is
:mod:`retrofit.ultralytics`, whose docstring says what it does): Ultralytics' trainer of a
task with attention inserted into the model it builds, before the weights load.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...api import NothingSelectedWarning, retrofit
from ...build import apply_recipe
from ...errors import ModelLoadError, OptionError
from ...optim import split_groups
from ...options import RetrofitOptions
from ...recipe import Recipe, get_recipe
from ...report import report_of
from ...rulefile import RuleSet, resolve_rules
from ...shapes import resolve_input_size

__all__ = ["trainer", "RetrofitTrainer", "TRAINERS", "FIRST_VERSION"]

# The module the trainer classes are made in, as users import them.
_PUBLIC_MODULE = "retrofit.ultralytics"

# The first Ultralytics release whose multi-GPU training hands its workers the trainer's class
# and model pickled (ultralytics/utils/dist.py, generate_ddp_file). Earlier releases write
# `from MODULE import NAME` into the worker's script, which cannot import a class that
# trainer() makes at run time. pyproject.toml's `ultralytics` extra declares the same floor.
FIRST_VERSION = (8, 4, 140)
"""The oldest Ultralytics release :func:`trainer` works with (multi-GPU runs included)."""

# The task -> trainer class of Ultralytics (module, class), imported when used.
TRAINERS: dict[str, tuple[str, str]] = {
    "detect": ("ultralytics.models.yolo.detect", "DetectionTrainer"),
    "segment": ("ultralytics.models.yolo.segment", "SegmentationTrainer"),
    "classify": ("ultralytics.models.yolo.classify", "ClassificationTrainer"),
    "pose": ("ultralytics.models.yolo.pose", "PoseTrainer"),
    "obb": ("ultralytics.models.yolo.obb", "OBBTrainer"),
    "semantic": ("ultralytics.models.yolo.semantic", "SemanticSegmentationTrainer"),
    "depth": ("ultralytics.models.yolo.depth", "DepthTrainer"),
}
"""Each Ultralytics task and its trainer class (module, name), which :func:`trainer` extends."""

# What the trainer sets itself: retrofit()'s arguments, and options it takes from the run.
_SET_HERE = ("inplace", "verify")
_OPTIONS_SET_HERE = ("input_size", "keep_class", "scores")


class RetrofitTrainer:
    """What :func:`trainer` mixes into the task's Ultralytics trainer. Set by the subclass:
    ``retrofit_rules`` (a rule set), ``retrofit_options`` (a
    :class:`~retrofit.options.RetrofitOptions`; the input size is the run's ``imgsz``) and
    ``retrofit_lr_mult``."""

    retrofit_rules: RuleSet
    retrofit_options: RetrofitOptions = RetrofitOptions()
    retrofit_lr_mult: float = 1.0
    retrofit_check_identity: bool = True

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        model = super().get_model(cfg=cfg, weights=None, verbose=verbose)  # type: ignore[misc]
        source = weights.get("ema") or weights.get("model") if isinstance(weights, dict) else weights
        saved = get_recipe(source) if isinstance(source, nn.Module) else None
        imgsz = self.args.imgsz  # type: ignore[attr-defined]
        options = self.retrofit_options.replace(input_size=imgsz if isinstance(imgsz, int) else max(imgsz))
        # The insertion's random draws (the attention's init) are taken on a forked generator:
        # what Ultralytics draws afterwards (the new class layers model.load builds when the
        # class count changes, ...) is what it draws without attention, so a run with identity
        # gates starts exactly where plain fine-tuning of the same seed starts.
        with torch.random.fork_rng(devices=[]):
            model, how = self._insert(model, saved, options)
        if weights:
            model.load(weights)
        if verbose:
            _log(_inserted_line(model, how))
        return model

    def _insert(self, model: Any, saved: Recipe | None, options: RetrofitOptions) -> tuple[Any, str]:
        """The attention in ``model``: the modules of a retrofitted checkpoint's recipe (so that
        its attention weights have somewhere to load), then this trainer's where they differ
        (a resumed run refuses that). Returns the model and how the attention came in."""
        how = "inserted"
        if saved is not None and saved.rules is not None:
            for level in saved.chain():  # the levels of its recipe, on this fresh model
                model = apply_recipe(level, model)
            how = "rebuilt from the checkpoint"
            differs = _differences(saved, self.retrofit_rules, options, model)
            if not differs:
                return model, how
            if getattr(self.args, "resume", False):  # type: ignore[attr-defined]
                raise OptionError(_resume_refusal(differs))
        with warnings.catch_warnings():
            # A rule set that selects nothing in this model is said by the log line instead.
            warnings.simplefilter("ignore", NothingSelectedWarning)
            model = retrofit(model, rules=self.retrofit_rules, options=options, inplace=True,
                             check_identity=self.retrofit_check_identity)
        return model, "inserted"

    def build_optimizer(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().build_optimizer(model, *args, **kwargs)  # type: ignore[misc]
        if self.retrofit_lr_mult == 1.0:
            return optimizer
        groups = split_groups(optimizer.param_groups, model, self.retrofit_lr_mult)
        optimizer.param_groups.clear()
        optimizer.state.clear()
        for g in groups:
            optimizer.add_param_group(g)
        return optimizer


def _differences(saved: Recipe, rules: RuleSet, options: RetrofitOptions, model: nn.Module) -> list[str]:
    """What a checkpoint's recipe holds that this trainer would not insert: its rules, and
    each option (compared as the recipe records them), in words."""
    wanted = options.replace(input_size=resolve_input_size(model, options.input_size)).recorded()
    out = [] if saved.rules == rules.doc else [f"the rules ({saved.rules_name} in the checkpoint, {rules.name} here)"]
    return out + [f"{name} ({theirs!r} in the checkpoint, {mine!r} here)"
                  for name, mine, theirs in wanted.differences(saved.options)]


def _resume_refusal(differs: list[str]) -> str:
    return (f"retrofit.ultralytics: cannot resume this run with another attention: the trainer differs from the run's "
            f"in {'; '.join(differs)}. Resume with the trainer the run started with, or start a new run from the "
            "checkpoint (without resume=True) to add this trainer's attention")


def _log(line: str) -> None:
    from ultralytics.utils import LOGGER

    LOGGER.info(line)


def _inserted_line(model: nn.Module, how: str) -> str:
    """The one line the training log gets: what attention went in, and what it costs (the
    summary Ultralytics prints before it counts the model without it)."""
    report = report_of(model)
    if report is None:
        return "retrofit: no attention in this model"
    kinds = ", ".join(dict.fromkeys(r.attn for r in report.rows)) or "no"
    pct = 100.0 * report.params_added / report.params_before if report.params_before else 0.0
    return (f"retrofit: {kinds} attention {how} at {len(report.rows)} sites; parameters "
            f"{report.params_before:,} -> {report.params_after:,} (+{report.params_added:,}, +{pct:.2f}%)")


class _Factory:
    """What :func:`trainer` returns: Ultralytics calls it as it calls a trainer class, and
    it builds the trainer of the task it is called for."""

    def __init__(self, rules: RuleSet, options: RetrofitOptions, lr_mult: float, check_identity: bool) -> None:
        self.rules, self.options, self.lr_mult, self.check_identity = rules, options, lr_mult, check_identity
        self._classes: dict[str, type] = {}

    def for_task(self, task: str) -> type:
        """The trainer class for ``task`` (``"detect"``, ``"segment"``, ...)."""
        if task not in TRAINERS:
            raise OptionError(f"retrofit.ultralytics: no trainer for task {task!r} (valid: {', '.join(TRAINERS)})")
        if task not in self._classes:
            import importlib

            module, name = TRAINERS[task]
            base = getattr(importlib.import_module(module), name)
            self._classes[task] = type(f"Retrofit{name}", (RetrofitTrainer, base), {
                "retrofit_rules": self.rules, "retrofit_options": self.options, "retrofit_lr_mult": self.lr_mult,
                "retrofit_check_identity": self.check_identity,
                "__module__": _PUBLIC_MODULE, "__doc__": f"Ultralytics' {name} with retrofit's attention "
                                                         f"({self.rules.name}) inserted before the weights load."})
        return self._classes[task]

    def __call__(self, cfg: Any = None, overrides: dict[str, Any] | None = None, _callbacks: Any = None) -> Any:
        task = (overrides or {}).get("task") or "detect"
        kwargs = {"overrides": overrides, "_callbacks": _callbacks}
        if cfg is not None:
            kwargs["cfg"] = cfg
        return self.for_task(task)(**kwargs)

    def __repr__(self) -> str:
        changed = {name: mine for name, mine, _ in self.options.differences(RetrofitOptions())}
        checked = "" if self.check_identity else ", check_identity=False"
        return f"retrofit.ultralytics.trainer({self.rules.name}, lr_mult={self.lr_mult}{checked}, {changed})"


def trainer(attn: str | None = "se", *, rules: str | Path | RuleSet | None = None, lr_mult: float = 1.0,
            check_identity: bool = True, options: RetrofitOptions | None = None, **overrides: Any) -> _Factory:
    """The trainer to pass to ``YOLO(...).train(trainer=...)``: Ultralytics' own trainer for
    the model's task, with attention inserted into the model it builds before the weights load.

    Args:
        attn: a built-in rule set (``"se"``, ``"cbam"``, ``"yolo-cbam-backbone"``, ...; see
            ``retrofit list``) when ``rules`` is None.
        rules: a rule file or :class:`~retrofit.rulefile.RuleSet`.
        lr_mult: the attention parameters' learning rate, as a multiple of Ultralytics' ``lr0``
            (they get parameter groups of their own when it is not 1).
        check_identity: as :func:`retrofit.retrofit`'s: refuse an identity-gate module that
            does not return its input at init (False lets a custom module that is not an
            identity in; training then starts away from the checkpoint's output).
        options: :func:`retrofit.retrofit`'s options as a record
            (:class:`~retrofit.options.RetrofitOptions`); the input size is the run's ``imgsz``.
        overrides: options by name, over ``options`` (``gate``, ``attn_args``,
            ``leaf_modules``, ``fuse``, ...).

    Returns:
        A callable Ultralytics calls as a trainer class; ``.for_task("detect")`` gives the class.

    Raises:
        OptionError: an option the trainer sets itself, an unknown option, or a bad ``lr_mult``.
        ModelLoadError: Ultralytics is missing or older than :data:`FIRST_VERSION`.

    Example:
        >>> YOLO("yolov8n.pt").train(data="coco8.yaml", trainer=retrofit.ultralytics.trainer("cbam"))
    """
    _check_version()
    given = RetrofitOptions.of(options, **{k: v for k, v in overrides.items() if k not in _SET_HERE})
    bad = sorted(set(overrides) & set(_SET_HERE)) + [name for name, _, _ in given.differences(RetrofitOptions())
                                                     if name in _OPTIONS_SET_HERE]
    if bad:
        raise OptionError(f"retrofit.ultralytics.trainer sets {', '.join(bad)} itself; leave them out")
    if not (isinstance(lr_mult, (int, float)) and lr_mult > 0):
        raise OptionError(f"lr_mult = {lr_mult!r} is not valid: a positive number (1 keeps Ultralytics' lr0)")
    return _Factory(resolve_rules(attn, rules), given, float(lr_mult), bool(check_identity))


def _check_version() -> None:
    """Refuse an Ultralytics older than :data:`FIRST_VERSION`, whose multi-GPU workers
    could not rebuild the trainer.

    Raises:
        ModelLoadError: Ultralytics is missing or older.
    """
    from importlib import metadata

    floor = ".".join(map(str, FIRST_VERSION))
    try:
        found = metadata.version("ultralytics")
    except metadata.PackageNotFoundError:
        found = None
    if found is None:
        raise ModelLoadError(f"retrofit.ultralytics needs the package 'ultralytics' (>= {floor}), which is not "
                             "installed; pip install 'torch-retrofit[ultralytics]'")
    parts = tuple(int(m.group()) if (m := re.match(r"\d+", x)) else 0 for x in found.split(".")[:3])
    if parts < FIRST_VERSION:
        raise ModelLoadError(f"retrofit.ultralytics.trainer needs ultralytics >= {floor} (found {found}): older "
                             "releases rebuild the trainer of a multi-GPU run by importing its class by name, which "
                             f"a trainer made at run time cannot be; pip install -U 'ultralytics>={floor}'")
