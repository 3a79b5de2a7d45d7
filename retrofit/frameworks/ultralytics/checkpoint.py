"""The Ultralytics checkpoint's layout (``.pt``), as one record: what :func:`save_checkpoint`
writes and ``YOLO(path)`` reads.

Ultralytics' trainer writes these keys in ``BaseTrainer.save_model``; a checkpoint retrofit
writes is one of a finished run (``epoch = -1``: nothing to resume), whose ``model`` is the
retrofitted model in half precision, as Ultralytics stores it. The file is a pickle of the
model: reading it runs code, so retrofit reads one only with ``trust_code``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...atomic import write_file_atomic
from ...errors import ModelLoadError, OptionError, SaveError
from ...meta import original_class
from ...text import excerpt
from ._offline import offline

__all__ = ["save_checkpoint"]

_PLAIN = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class UltralyticsCheckpoint:
    """An Ultralytics checkpoint: the model, and what Ultralytics' trainer records beside it.
    ``to_dict`` is the file's content; ``from_dict`` reads one back, checking every key."""

    model: nn.Module  # the model (in half precision, as Ultralytics saves it)
    train_args: Mapping[str, Any]  # Ultralytics' training arguments: plain values only
    date: str  # when it was written (ISO 8601)
    version: str  # the Ultralytics version that wrote it
    epoch: int = -1  # the last epoch done; -1: a finished run, nothing to resume
    best_fitness: float | None = None  # the run's best fitness; None: no run
    ema: nn.Module | None = None  # the EMA model of a run; None: the model is the weights
    updates: int | None = None  # the EMA's update count
    optimizer: Mapping[str, Any] | None = None  # the optimizer state of a run to resume

    @classmethod
    def of_model(cls, model: nn.Module) -> UltralyticsCheckpoint:
        """The checkpoint of a finished run holding ``model`` (a copy, in half precision),
        with Ultralytics' default training arguments and the model's own."""
        with offline():
            from ultralytics import __version__ as ultralytics_version
            from ultralytics.cfg import get_cfg

        args = dict(vars(get_cfg()))
        own = getattr(model, "args", None)
        args.update(vars(own) if hasattr(own, "__dict__") else dict(own or {}))
        plain = {k: v for k, v in args.items() if isinstance(v, _PLAIN)}
        return cls(model=copy.deepcopy(model).half(), train_args=plain, date=datetime.now().isoformat(),
                   version=str(ultralytics_version))

    def to_dict(self) -> dict[str, Any]:
        """The file's content: every field under its name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> UltralyticsCheckpoint:
        """Read a checkpoint's content (already unpickled), checking every field's presence
        and type.

        Raises:
            ModelLoadError: naming the field and what is wrong with it.
        """
        if not isinstance(d, Mapping):
            raise ModelLoadError(f"{where}: an Ultralytics checkpoint is a table, not a {type(d).__name__}")
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ModelLoadError(f"{where}: the Ultralytics checkpoint lacks {', '.join(map(repr, missing))}")
        values = {f.name: d[f.name] for f in fields(cls)}
        for name, kinds in _TYPES.items():
            if not isinstance(values[name], kinds) or (isinstance(values[name], bool) and bool not in kinds):
                raise ModelLoadError(f"{where}: the Ultralytics checkpoint's {name!r} is a "
                                     f"{type(values[name]).__name__} ({excerpt(values[name], 40)})")
        if not all(isinstance(k, str) and isinstance(v, _PLAIN) for k, v in values["train_args"].items()):
            raise ModelLoadError(f"{where}: the Ultralytics checkpoint's 'train_args' is not a table of plain values")
        return cls(**values)


_TYPES: dict[str, tuple[type, ...]] = {
    "model": (nn.Module,), "train_args": (Mapping,), "date": (str,), "version": (str,), "epoch": (int,),
    "best_fitness": (int, float, type(None)), "ema": (nn.Module, type(None)), "updates": (int, type(None)),
    "optimizer": (Mapping, type(None)),
}


def save_checkpoint(model: nn.Module, path: str | Path, *, force: bool = False) -> Path:
    """Write ``model`` (an Ultralytics model retrofit built) as an Ultralytics checkpoint that
    ``YOLO(path)`` loads and that :func:`retrofit.ultralytics.trainer` trains on from (its
    attention weights load). Written with :func:`retrofit.atomic.write_file_atomic`: without
    ``force`` the name is claimed atomically; an interrupted write leaves the previous file
    as it was.

    Raises:
        OptionError: ``model`` is not an Ultralytics model.
        SaveError: the path exists (without ``force``) or cannot be written.
    """
    path = Path(path)
    if not original_class(model).__module__.startswith("ultralytics."):
        raise OptionError(f"{type(model).__name__} is not an Ultralytics model; save it with retrofit.save")
    if path.suffix != ".pt":
        raise SaveError(f"an Ultralytics checkpoint is a .pt file, not {str(path)!r}")
    if os.path.lexists(path) and not force:  # before the copy; write_file_atomic claims the name
        raise SaveError(f"{str(path)!r} exists; not overwriting it (pass --force / force=True to replace it)")
    ckpt = UltralyticsCheckpoint.of_model(model).to_dict()
    return write_file_atomic(path, lambda t: torch.save(ckpt, t), replace=force)
