"""Training checkpoints that rebuild the model: a model spec plus every state a resume needs.

A retrofitted model is a ``torch.fx.GraphModule`` whose code is generated, so a training
checkpoint stores how to make it again (the base model's name and arguments, and the
retrofit options) next to the weights, the optimizer, the schedule, the epoch and the RNG
states. :func:`load_model` calls :func:`retrofit.retrofit` again and loads the weights.
Only plain data and tensors are stored, so ``torch.load`` runs with ``weights_only=True``.

(:mod:`retrofit.checkpoint` loads a user's plain weights into a model before the rewrite;
:mod:`retrofit.serialize` saves a finished model for inference.)
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ModelLoadError

__all__ = ["ModelSpec", "save_state", "load_state", "load_model", "rng_state", "set_rng_state", "FORMAT"]

FORMAT = "retrofit-train/1"


@dataclass(frozen=True)
class ModelSpec:
    """How to build a retrofitted model again.

    Example:
        >>> spec = ModelSpec("resnet18", attn="se", model_kwargs={"num_classes": 10})
        >>> gm = spec.build()
    """

    model: str  # timm name, "torchvision:NAME" or "path/to/file.py:factory"
    attn: str | None = "se"  # built-in rule set; None when `rules` is given
    rules: str | None = None  # rule file path, instead of `attn`
    gate: str | None = None  # "identity" or "sigmoid"; None keeps the rules' gate
    attn_args: Mapping[str, Any] | None = None  # attention argument overrides
    input_size: tuple[int, ...] | None = None  # size retrofit analyses the model at
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # base model arguments (num_classes, ...)
    retrofitted: bool = True  # False: the base model alone (a baseline), no attention
    keep_class: bool = False  # rewrite submodules in place and keep the model's class
    fuse: bool = True  # fuse gating modules into residual adds

    def build_base(self, pretrained: bool = False) -> nn.Module:
        """The base model, before attention (fresh weights unless ``pretrained``).

        Raises:
            ModelLoadError: the model name is unknown, or ``model_kwargs`` other than
                ``num_classes`` are given for a torchvision or file model.
        """
        import timm

        from .models import create_model

        kwargs = dict(self.model_kwargs)
        name = self.model.split(":", 1)[1] if self.model.startswith("timm:") else self.model
        if name.startswith("torchvision:") or ".py:" in name:
            extra = sorted(set(kwargs) - {"num_classes"})
            if extra:
                raise ModelLoadError(
                    f"{self.model}: model_kwargs {extra} are only passed to timm models; "
                    "torchvision and file models take num_classes only"
                )
            return create_model(name, pretrained=pretrained, num_classes=kwargs.get("num_classes"))
        if name.startswith("hf-hub:") or timm.is_model(name):
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        return create_model(name)  # raises the error that names the closest models

    def build(self, base: nn.Module | None = None, *, pretrained: bool = False, verify: bool = True) -> nn.Module:
        """Retrofit ``base`` (default: :meth:`build_base`) with this spec's options.

        Returns the base model itself when ``retrofitted`` is False.
        """
        base = self.build_base(pretrained) if base is None else base
        if not self.retrofitted:
            return base
        from .api import retrofit

        return retrofit(base, self.attn, rules=self.rules, gate=self.gate, attn_args=self.attn_args,
                        input_size=self.input_size, verify=verify, keep_class=self.keep_class, fuse=self.fuse)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attn_args"] = None if self.attn_args is None else dict(self.attn_args)
        d["model_kwargs"] = dict(self.model_kwargs)
        d["input_size"] = None if self.input_size is None else tuple(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        """The inverse of :meth:`to_dict`.

        Raises:
            ModelLoadError: ``d`` is not a model spec.
        """
        d = dict(d)
        if d.get("input_size") is not None:
            d["input_size"] = tuple(d["input_size"])
        try:
            return cls(**d)
        except TypeError as e:
            raise ModelLoadError(f"invalid model spec in checkpoint: {e}") from e


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: Python, NumPy, torch CPU and CUDA."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_state(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) atomically: a temporary file, then a rename.

    In a distributed run only rank 0 calls this.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_state` (tensors on the CPU).

    Raises:
        ModelLoadError: the file is missing or is not a retrofit training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"training checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"cannot read training checkpoint {str(path)!r} ({type(e).__name__} in torch.load); "
            "expected a last.pt or best.pt written by retrofit.finetune.fit"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelLoadError(
            f"{str(path)!r} is not a retrofit training checkpoint (expected format {FORMAT!r}); "
            "it must come from retrofit.finetune.fit (last.pt or best.pt)"
        )
    return ckpt


def load_model(path: str | Path) -> nn.Module:
    """Rebuild the model of a training checkpoint: its spec, retrofitted again, then its weights.

    Raises:
        ModelLoadError: the checkpoint is unreadable, has no model spec, or its weights do
            not fit the rebuilt model.

    Example:
        >>> gm = load_model("runs/se/best.pt")
    """
    ckpt = load_state(path)
    if ckpt.get("spec") is None:
        raise ModelLoadError(f"{str(path)!r} has no model spec; pass spec= to fit() to make checkpoints rebuildable")
    model = ModelSpec.from_dict(ckpt["spec"]).build(verify=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelLoadError(f"weights in {str(path)!r} do not fit the model its spec builds: {first}") from e
    return model
