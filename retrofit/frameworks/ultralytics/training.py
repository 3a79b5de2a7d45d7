"""Attention in Ultralytics YOLO training: a trainer to pass to ``YOLO.train``.

``YOLO(...).train()`` does not train the model object it holds: its trainer builds a fresh
model from the yaml and copies over the weights whose names match (``get_model`` +
``intersect_dicts``), so attention inserted beforehand is silently dropped, and callbacks
run too early or too late to insert it. :func:`trainer` returns a trainer for the model's
task (detect, segment, classify, pose, obb, ...) whose ``get_model`` builds the model,
inserts the attention, *then* loads the weights:

* from a checkpoint without attention (``yolov8n.pt``): the inserted modules are identity
  gates, so training starts from exactly the pretrained model (its first validation equals
  the original's);
* from a retrofitted checkpoint (``last.pt`` / ``best.pt`` of such a run): the checkpoint
  carries its recipe; the same modules are inserted once and its attention weights load;
* ``resume=True`` continues a stopped run (pass the same trainer).

The attention parameters join Ultralytics' own parameter groups, as any parameter of the
model would: conv and linear weights in ``weight`` (with weight decay; MuSGD's ``muon`` group
when that optimizer is chosen), biases in ``bias`` (no decay), and 1-D weights (GE's and
SimAM's ``alpha``) in ``weight`` too. ``lr_mult`` puts them in groups of their own with the
learning rate multiplied (warm-up and schedule scale them alike).

Checkpoints (``last.pt``, ``best.pt``) are Ultralytics' pickles of the model: they hold the
attention, and ``YOLO("best.pt")`` loads them in any process where retrofit is installed
(``pip install torch-retrofit``; Ultralytics' own auto-install would fetch the unrelated
``retrofit`` package). ``predict``, ``val``, ``fuse()`` and ``export(format="onnx")`` work
on them. A pickle runs code when read: retrofit itself reads one only with ``trust_code``.

Example:
    >>> from ultralytics import YOLO
    >>> import retrofit.ultralytics
    >>> YOLO("yolov8n.pt").train(data="coco8.yaml", epochs=10, trainer=retrofit.ultralytics.trainer("cbam"))
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import retrofit
from .build import apply_recipe
from .errors import ModelLoadError, OptionError
from .frameworks._ultralytics import offline
from .optim import split_groups
from .recipe import Recipe, get_recipe
from .report import report_of
from .rulefile import RuleSet, resolve_rules

__all__ = ["trainer", "RetrofitTrainer", "TRAINERS", "FIRST_VERSION", "save_checkpoint", "load_checkpoint"]

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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        # A rule set that selects nothing in this model is said by the log line instead.
        warnings.filterwarnings("ignore", message=".*selected no site.*")
        yield


class RetrofitTrainer:
    """What :func:`trainer` mixes into the task's Ultralytics trainer. Set by the subclass:
    ``retrofit_rules`` (a rule set) and ``retrofit_options`` (:func:`retrofit.retrofit`'s
    keyword arguments), ``retrofit_lr_mult``."""

    retrofit_rules: RuleSet
    retrofit_options: Mapping[str, Any] = {}
    retrofit_lr_mult: float = 1.0

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None, verbose: bool = True) -> nn.Module:
        model = super().get_model(cfg=cfg, weights=None, verbose=verbose)  # type: ignore[misc]
        source = weights.get("ema") or weights.get("model") if isinstance(weights, dict) else weights
        saved = get_recipe(source) if isinstance(source, nn.Module) else None
        imgsz = self.args.imgsz  # type: ignore[attr-defined]
        size = imgsz if isinstance(imgsz, int) else max(imgsz)
        # The insertion's random draws (the attention's init) are taken on a forked generator:
        # what Ultralytics draws afterwards (the new class layers model.load builds when the
        # class count changes, ...) is what it draws without attention, so a run with identity
        # gates starts exactly where plain fine-tuning of the same seed starts.
        how = "inserted"
        with _quiet(), torch.random.fork_rng(devices=[]):
            if saved is not None and saved.rules is not None:
                # A retrofitted checkpoint: the same modules again (the levels of its recipe on
                # this fresh model), so that its attention weights have somewhere to load.
                for level in saved.chain():
                    model = apply_recipe(level, model)
                how = "rebuilt from the checkpoint"
            if saved is None or saved.rules != self.retrofit_rules.doc or _options(saved) != _wanted(self):
                model = retrofit(model, rules=self.retrofit_rules, input_size=size, inplace=True,
                                 **self.retrofit_options)
                how = "inserted"
        if weights:
            model.load(weights)
        if verbose:
            _log(_inserted_line(model, how))
        return model

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


def _options(recipe: Recipe) -> dict[str, Any]:
    return {"gate": recipe.options.gate, "attn_args": dict(recipe.options.attn_args) or None}


def _wanted(t: RetrofitTrainer) -> dict[str, Any]:
    return {"gate": t.retrofit_options.get("gate"), "attn_args": t.retrofit_options.get("attn_args") or None}


class _Factory:
    """What :func:`trainer` returns: Ultralytics calls it as it calls a trainer class, and
    it builds the trainer of the task it is called for."""

    def __init__(self, rules: RuleSet, options: Mapping[str, Any], lr_mult: float) -> None:
        self.rules, self.options, self.lr_mult = rules, dict(options), lr_mult
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
                "__module__": __name__, "__doc__": f"Ultralytics' {name} with retrofit's attention "
                                                  f"({self.rules.name}) inserted before the weights load."})
        return self._classes[task]

    def __call__(self, cfg: Any = None, overrides: dict[str, Any] | None = None, _callbacks: Any = None) -> Any:
        task = (overrides or {}).get("task") or "detect"
        kwargs = {"overrides": overrides, "_callbacks": _callbacks}
        if cfg is not None:
            kwargs["cfg"] = cfg
        return self.for_task(task)(**kwargs)

    def __repr__(self) -> str:
        return f"retrofit.ultralytics.trainer({self.rules.name}, lr_mult={self.lr_mult}, {self.options})"


def trainer(attn: str | None = "se", *, rules: str | Path | RuleSet | None = None, lr_mult: float = 1.0,
            **options: Any) -> _Factory:
    """The trainer to pass to ``YOLO(...).train(trainer=...)``: Ultralytics' own trainer for
    the model's task, with attention inserted into the model it builds before the weights load.

    Args:
        attn: a built-in rule set (``"se"``, ``"cbam"``, ``"yolo-cbam-backbone"``, ...; see
            ``retrofit list``) when ``rules`` is None.
        rules: a rule file or :class:`~retrofit.rulefile.RuleSet`.
        lr_mult: the attention parameters' learning rate, as a multiple of Ultralytics' ``lr0``
            (they get parameter groups of their own when it is not 1).
        options: further :func:`retrofit.retrofit` options (``gate``, ``attn_args``,
            ``leaf_modules``, ``fuse``, ...).

    Returns:
        A callable Ultralytics calls as a trainer class; ``.for_task("detect")`` gives the class.

    Example:
        >>> YOLO("yolov8n.pt").train(data="coco8.yaml", trainer=retrofit.ultralytics.trainer("cbam"))
    """
    _check_version()
    bad = sorted(set(options) & {"inplace", "input_size", "keep_class", "verify", "scores"})
    if bad:
        raise OptionError(f"retrofit.ultralytics.trainer sets {', '.join(bad)} itself; leave them out")
    if not (isinstance(lr_mult, (int, float)) and lr_mult > 0):
        raise OptionError(f"lr_mult = {lr_mult!r} is not valid: a positive number (1 keeps Ultralytics' lr0)")
    return _Factory(resolve_rules(attn, rules), options, float(lr_mult))


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


def save_checkpoint(model: nn.Module, path: str | Path, *, force: bool = False) -> Path:
    """Write ``model`` (an Ultralytics model retrofit built) as an Ultralytics checkpoint that
    ``YOLO(path)`` loads and that :func:`trainer` trains on from (its attention weights load).
    Written with :func:`retrofit.atomic.write_file_atomic`: without ``force`` the name is
    claimed atomically; an interrupted write leaves the previous file as it was.

    Raises:
        OptionError: ``model`` is not an Ultralytics model.
        SaveError: the path exists (without ``force``) or cannot be written.
    """
    import copy
    import os
    from datetime import datetime

    from .atomic import write_file_atomic
    from .errors import SaveError

    path = Path(path)
    cls = getattr(type(model), "_retrofit_original", type(model))
    if not cls.__module__.startswith("ultralytics."):
        raise OptionError(f"{type(model).__name__} is not an Ultralytics model; save it with retrofit.save")
    if path.suffix != ".pt":
        raise SaveError(f"an Ultralytics checkpoint is a .pt file, not {str(path)!r}")
    if os.path.lexists(path) and not force:  # before the copy; write_file_atomic claims the name
        raise SaveError(f"{str(path)!r} exists; not overwriting it (pass --force / force=True to replace it)")
    with offline():
        from ultralytics import __version__ as ultralytics_version
        from ultralytics.cfg import get_cfg

    snapshot = copy.deepcopy(model).half()
    args = dict(vars(get_cfg()))
    own = getattr(model, "args", None)
    args.update(vars(own) if hasattr(own, "__dict__") else dict(own or {}))
    ckpt = {"epoch": -1, "best_fitness": None, "model": snapshot, "ema": None, "updates": None, "optimizer": None,
            "train_args": {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, type(None)))},
            "date": datetime.now().isoformat(), "version": ultralytics_version}
    return write_file_atomic(path, lambda t: torch.save(ckpt, t), replace=force)


def load_checkpoint(path: str | Path, *, trust_code: bool = False) -> nn.Module:
    """Read an Ultralytics checkpoint (a pickle: it runs code, so ``trust_code`` is required).

    Raises:
        UntrustedCodeError: without ``trust_code``.
        ModelLoadError: missing or unreadable.
    """
    from .models import create_model

    if not Path(path).is_file():
        raise ModelLoadError(f"Ultralytics checkpoint {str(path)!r} not found")
    return create_model(f"ultralytics:{path}", trust_code=trust_code)
