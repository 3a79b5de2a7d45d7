"""The training checkpoint's layout: one record, written by :func:`retrofit.finetune.fit`
and validated on every resume before anything is loaded.

A checkpoint (``last.pt``, ``best.pt``) is read with ``torch.load(weights_only=True)``, so
it runs no code; but its values are still someone else's data. A resume checks every key
and type, the epoch and step against the run, the weights' names and shapes against the
model and the optimizer and scheduler state against this run's optimizer and scheduler,
and only then loads anything: a damaged or crafted checkpoint is one
:class:`~retrofit.errors.ModelLoadError` and leaves the model and optimizer as they were.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ModelLoadError
from .text import excerpt

__all__ = ["TRAIN_FORMAT", "OLD_TRAIN_FORMAT", "TrainingCheckpoint"]

TRAIN_FORMAT = "retrofit-train/2"  # the format tag fit writes
OLD_TRAIN_FORMAT = "retrofit-train/1"  # retrofit 0.1's: the same fields, with "spec" for "recipe"

_WRITTEN_BY = "it was not written by retrofit.finetune.fit"


def _fail(where: str, what: str) -> ModelLoadError:
    return ModelLoadError(f"{where}: {what}; {_WRITTEN_BY} (resume from the last.pt of this run)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plain(value: Any, depth: int = 0) -> bool:
    """Plain data (numbers, strings, booleans, None, lists and tables of them) of small depth."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if depth > 8:
        return False
    if isinstance(value, (list, tuple)):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


@dataclass(frozen=True)
class TrainingCheckpoint:
    """What a training checkpoint holds: the model's recipe, its weights, and everything a
    resume needs. ``to_dict`` is the file's content (with the format tag); ``from_dict``
    reads it back, checking every field.

    Example:
        >>> ckpt = TrainingCheckpoint.from_dict(load_training_state("runs/se/last.pt"), "last.pt")
        >>> ckpt.epoch, ckpt.step
        (3, 375)
    """

    recipe: Mapping[str, Any] | None  # Recipe.to_dict() of the model; None: a model retrofit() did not build
    versions: Mapping[str, str]  # package versions the run used
    buffers: tuple[str, ...]  # names of the weights that are buffers (parameters are counted from a file)
    model: Mapping[str, Tensor]  # the model's state dict
    optimizer: Mapping[str, Any] | None  # the optimizer's state dict; None in best.pt
    scheduler: Mapping[str, Any] | None  # the LambdaLR's state dict; None in best.pt
    epoch: int  # epochs done
    step: int  # optimizer steps done
    rng: tuple[Mapping[str, Any], ...]  # each rank's random states (rng_state())
    config: Mapping[str, Any]  # the FinetuneConfig, as a table
    history: tuple[Mapping[str, Any], ...]  # one metrics record per epoch done
    best_val_acc: float  # best validation accuracy so far (-1.0 before any)
    best_epoch: int  # its epoch (0 before any)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint file's content: every field, and the format tag."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"format": TRAIN_FORMAT, **d, "buffers": list(self.buffers), "rng": list(self.rng),
                "history": [dict(h) for h in self.history]}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TrainingCheckpoint:
        """Read a checkpoint's content, checking the format tag and every field's presence
        and type, the epoch and step (>= 0), the best epoch (within the epochs done), one
        history record per epoch and the random states' layout.

        Raises:
            ModelLoadError: naming the field and what is wrong with it.
        """
        if not isinstance(d, Mapping):
            raise _fail(where, f"the checkpoint is a {type(d).__name__}, not a table")
        fmt = d.get("format")
        if fmt not in (TRAIN_FORMAT, OLD_TRAIN_FORMAT):
            raise _fail(where, f"unknown checkpoint format {excerpt(fmt, 40)} (this retrofit reads {TRAIN_FORMAT!r})")
        d = {**d, "recipe": d.get("recipe")} if fmt == TRAIN_FORMAT else {**d, "recipe": None}
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise _fail(where, f"the checkpoint lacks {', '.join(repr(m) for m in missing)}")
        values = {f.name: d[f.name] for f in fields(cls)}
        _check_types(values, where)
        epoch, step = values["epoch"], values["step"]
        if epoch < 0 or step < 0:
            raise _fail(where, f"epoch {epoch} and step {step} must be >= 0")
        if len(values["history"]) != epoch:
            raise _fail(where, f"its history has {len(values['history'])} records for {epoch} epochs done")
        if not (0 <= values["best_epoch"] <= epoch and -1.0 <= values["best_val_acc"] <= 1.0):
            raise _fail(where, f"best_epoch {values['best_epoch']} / best_val_acc {values['best_val_acc']!r} are not "
                               f"an epoch in 0..{epoch} and an accuracy in [-1, 1]")
        for i, state in enumerate(values["rng"]):
            _check_rng(state, f"{where}: random state {i}")
        values.update(buffers=tuple(values["buffers"]), rng=tuple(values["rng"]), history=tuple(values["history"]))
        return cls(**values)

    # ------------------------------------------------------------------ resuming

    def check_resume(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, *, epochs: int, max_steps_per_epoch: int,
                     where: str) -> None:
        """Check that this checkpoint can resume a run of ``model`` with ``optimizer`` and
        ``scheduler`` for ``epochs`` epochs of at most ``max_steps_per_epoch`` steps: it has
        an optimizer and scheduler state (``last.pt``, not ``best.pt``), its epoch is within
        ``epochs``, its weights have exactly the model's names and shapes, and its optimizer
        and scheduler states have this run's groups, parameters and fields. Loads nothing.

        Raises:
            ModelLoadError: the first thing that does not match, named.
        """
        if self.optimizer is None or self.scheduler is None:
            raise ModelLoadError(f"{where}: this checkpoint holds no optimizer and scheduler state (a best.pt holds "
                                 "the weights only); resume from the last.pt of the run")
        if self.epoch > epochs:
            raise ModelLoadError(f"{where}: the checkpoint is at epoch {self.epoch}, past this run's epochs = "
                                 f"{epochs}; resume with epochs >= the checkpoint's, or start a new run")
        if self.step > self.epoch * max_steps_per_epoch:
            raise _fail(where, f"step {self.step} is more than {self.epoch} epochs of at most {max_steps_per_epoch} "
                               "steps take")
        _check_weights(self.model, model, where)
        _check_optimizer(self.optimizer, optimizer, where)
        _check_scheduler(self.scheduler, scheduler, where)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, where: str) -> None:
        """Load the weights, optimizer and scheduler states (after :meth:`check_resume`). On
        a failure the optimizer and scheduler get their states back and the model is not
        touched (it is loaded last, and its names and shapes were checked).

        Raises:
            ModelLoadError: a state that does not load.
        """
        if self.optimizer is None or self.scheduler is None:
            raise ModelLoadError(f"{where}: this checkpoint holds no optimizer and scheduler state; resume from the "
                                 "last.pt of the run")
        saved_opt, saved_sched = copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict())
        try:
            optimizer.load_state_dict(copy.deepcopy(dict(self.optimizer)))
            # The schedule functions are the run's own (fit sets them right after): only the
            # counters and rates are taken from the file.
            scheduler.load_state_dict({**self.scheduler, "lr_lambdas": [None] * len(optimizer.param_groups)})
        except Exception as e:
            optimizer.load_state_dict(saved_opt)
            scheduler.load_state_dict(saved_sched)
            raise _fail(where, f"its optimizer or scheduler state does not load ({type(e).__name__}: {e})") from e
        model.load_state_dict(dict(self.model))


# --------------------------------------------------------------------------- checks

_TYPES: dict[str, tuple[type, ...]] = {
    "recipe": (Mapping, type(None)), "versions": (Mapping,), "buffers": (list, tuple), "model": (Mapping,),
    "optimizer": (Mapping, type(None)), "scheduler": (Mapping, type(None)), "epoch": (int,), "step": (int,),
    "rng": (list, tuple), "config": (Mapping,), "history": (list, tuple), "best_val_acc": (int, float),
    "best_epoch": (int,),
}


def _check_types(values: Mapping[str, Any], where: str) -> None:
    for name, kinds in _TYPES.items():
        v = values[name]
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            raise _fail(where, f"its {name!r} is a {type(v).__name__} ({excerpt(v, 40)})")
    if not _is_number(values["best_val_acc"]):
        raise _fail(where, f"its 'best_val_acc' {values['best_val_acc']!r} is not a finite number")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values["versions"].items()):
        raise _fail(where, "its 'versions' is not a table of version strings")
    if not all(isinstance(b, str) for b in values["buffers"]):
        raise _fail(where, "its 'buffers' is not a list of tensor names")
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in values["model"].items()):
        raise _fail(where, "its 'model' is not a table of tensors by name")
    if not _plain(values["config"]) or not all(isinstance(h, Mapping) and _plain(h) for h in values["history"]):
        raise _fail(where, "its 'config' or 'history' is not plain data (tables of numbers and strings)")
    if values["recipe"] is not None and not all(isinstance(k, str) for k in values["recipe"]):
        raise _fail(where, "its 'recipe' is not a table")
    if not values["rng"]:
        raise _fail(where, "its 'rng' holds no random state")


def _check_rng(state: Any, where: str) -> None:
    """One rank's random states as :func:`retrofit.finetune.rng_state` writes them."""
    def bad(what: str) -> ModelLoadError:
        return ModelLoadError(f"{where}: {what}; {_WRITTEN_BY}")

    if not isinstance(state, Mapping) or set(state) != {"python", "numpy", "torch", "cuda"}:
        raise bad("not a table of the python, numpy, torch and cuda states")
    py = state["python"]
    if not (isinstance(py, (tuple, list)) and len(py) == 3 and _is_int(py[0])
            and isinstance(py[1], (tuple, list)) and len(py[1]) == 625
            and all(_is_int(v) and 0 <= v < 1 << 32 for v in py[1]) and py[1][-1] <= 624
            and (py[2] is None or _is_number(py[2]))):
        raise bad("its python state is not (version, 625 integers, gauss)")
    np_state = state["numpy"]
    if not (isinstance(np_state, (tuple, list)) and len(np_state) == 5 and np_state[0] == "MT19937"
            and isinstance(np_state[1], Tensor) and tuple(np_state[1].shape) == (624,)
            and not np_state[1].is_floating_point() and _is_int(np_state[2]) and 0 <= np_state[2] <= 624
            and _is_int(np_state[3]) and _is_number(np_state[4])):
        raise bad("its numpy state is not (\"MT19937\", 624 keys, position, has_gauss, gauss)")
    want = torch.get_rng_state()
    if not (isinstance(state["torch"], Tensor) and state["torch"].dtype == want.dtype
            and state["torch"].shape == want.shape):
        raise bad(f"its torch state is not a {want.dtype} tensor of {want.numel()} bytes")
    cuda = state["cuda"]
    if not (isinstance(cuda, (list, tuple)) and all(isinstance(t, Tensor) and t.dtype == torch.uint8 for t in cuda)):
        raise bad("its cuda state is not a list of byte tensors")


def _check_weights(saved: Mapping[str, Tensor], model: nn.Module, where: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    shape = [k for k in own if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)]
    if missing or extra or shape:
        parts = ([f"lacks {len(missing)} of the model's tensors (e.g. {missing[0]!r})"] if missing else []) + \
                ([f"has {len(extra)} the model lacks (e.g. {extra[0]!r})"] if extra else []) + \
                ([f"holds {shape[0]!r} as {list(saved[shape[0]].shape)}, the model {list(own[shape[0]].shape)}"]
                 if shape else [])
        raise ModelLoadError(f"{where}: its weights are not this model's: it {'; '.join(parts)}. Resume with the "
                             "model the run trained (retrofit.load of the checkpoint builds it)")
    kinds = [k for k in own if saved[k].is_floating_point() != own[k].is_floating_point()]
    if kinds:
        raise _fail(where, f"its tensor {kinds[0]!r} is {saved[kinds[0]].dtype}, the model's {own[kinds[0]].dtype}")


def _same_kind(a: Any, b: Any) -> bool:
    """Values of one optimizer or scheduler field in the file (a) and in this run (b)."""
    if _is_number(b):
        return _is_number(a) or (isinstance(a, Tensor) and a.numel() == 1)
    if isinstance(b, (tuple, list)):
        return isinstance(a, (tuple, list)) and len(a) == len(b) and all(_same_kind(x, y) for x, y in zip(a, b,
                                                                                                        strict=True))
    if isinstance(b, Tensor):
        return isinstance(a, Tensor) and a.shape == b.shape
    return type(a) is type(b) or (b is None and _is_number(a)) or (a is None and _is_number(b))


def _check_optimizer(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer, where: str) -> None:
    own = optimizer.state_dict()
    if set(saved) != set(own):
        raise _fail(where, f"its optimizer state has fields {sorted(map(str, saved))}, this optimizer "
                           f"{sorted(own)}")
    groups, own_groups = saved["param_groups"], own["param_groups"]
    if not isinstance(groups, (list, tuple)) or len(groups) != len(own_groups):
        n = len(groups) if isinstance(groups, (list, tuple)) else excerpt(groups, 40)
        raise _fail(where, f"its optimizer has {n} parameter groups, this run's {len(own_groups)}")
    shapes: dict[Any, tuple[int, ...]] = {}
    for i, (g, o, live) in enumerate(zip(groups, own_groups, optimizer.param_groups, strict=True)):
        if not isinstance(g, Mapping) or set(g) != set(o):
            raise _fail(where, f"its optimizer's group {i} has other fields than this run's ({sorted(o)})")
        params = g["params"]
        if not isinstance(params, (list, tuple)) or len(params) != len(o["params"]) \
                or not all(_is_int(p) for p in params):
            raise _fail(where, f"its optimizer's group {i} ({o.get('name', i)}) holds another number of parameters "
                               f"than this run's {len(o['params'])}")
        if g.get("name") != o.get("name"):
            raise _fail(where, f"its optimizer's group {i} is {excerpt(g.get('name'), 30)}, this run's "
                               f"{o.get('name')!r}")
        bad = next((k for k in o if k not in ("params", "name") and not _same_kind(g[k], o[k])), None)
        if bad is not None:
            raise _fail(where, f"its optimizer's group {i} sets {bad} to {excerpt(g[bad], 40)}")
        shapes.update({p: tuple(q.shape) for p, q in zip(params, live["params"], strict=True)})
    state = saved["state"]
    if not isinstance(state, Mapping):
        raise _fail(where, "its optimizer's per-parameter state is not a table")
    for key, entry in state.items():
        if key not in shapes or not isinstance(entry, Mapping):
            raise _fail(where, f"its optimizer holds state for parameter {excerpt(key, 20)}, which none of its "
                               "groups holds")
        for name, value in entry.items():
            ok = (isinstance(name, str) and (_is_number(value) or isinstance(value, Tensor) and (
                value.numel() == 1 and value.ndim <= 1 or tuple(value.shape) == shapes[key])))
            if not ok:
                raise _fail(where, f"its optimizer state {excerpt(name, 20)} of parameter {key} is "
                                   f"{excerpt(value, 40)}, not a value of the parameter's shape {list(shapes[key])}")


def _check_scheduler(saved: Mapping[str, Any], scheduler: torch.optim.lr_scheduler.LRScheduler, where: str) -> None:
    own = scheduler.state_dict()
    unknown = [k for k in saved if k not in own]
    if unknown:
        raise _fail(where, f"its scheduler state sets {excerpt(unknown[0], 30)}, which this run's scheduler does not "
                           f"have (fields: {', '.join(sorted(own))})")
    for k, v in saved.items():
        if k != "lr_lambdas" and not _same_kind(v, own[k]):
            raise _fail(where, f"its scheduler state sets {k} to {excerpt(v, 40)}, not a value like this run's "
                               f"{excerpt(own[k], 40)}")
    last = saved.get("last_epoch", 0)
    if not _is_int(last) or last < -1:
        raise _fail(where, f"its scheduler's last_epoch {excerpt(last, 20)} is not a step count")
