"""Building the model a user names: a timm name, ``torchvision:NAME`` or ``file.py:factory``."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ModelLoadError, first_line
from .recipe import Recipe, attach_recipe, is_file_spec

__all__ = ["create_model"]


def _download_error(what: str, e: Exception) -> ModelLoadError:
    first = (str(e).strip().splitlines() or [""])[0]
    return ModelLoadError(
        f"cannot download pretrained weights for {what} ({type(e).__name__}: {first}); check the network "
        "(or the local cache with HF_HUB_OFFLINE=1), or drop --pretrained and load weights with --checkpoint"
    )


def _timm(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    if not name.startswith("hf-hub:") and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ModelLoadError(f"unknown timm model {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as e:
        if not pretrained:
            first = first_line(e)
            raise ModelLoadError(f"cannot build timm model {name!r} ({type(e).__name__}: {first}); "
                                 "hf-hub: models need the network or the local cache (a retrofit save on the Hub "
                                 f"is not a base model: load it with retrofit.load({name!r}))") from e
        raise _download_error(repr(name), e) from e


def _torchvision(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    import inspect

    import torchvision.models as tvm

    names = tvm.list_models()  # every kind: classification, detection, segmentation, video, optical flow
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ModelLoadError(f"unknown torchvision model {name!r}{hint}")
    if not pretrained and "weights_backbone" in inspect.signature(tvm.get_model_builder(name)).parameters:
        # Detection and segmentation builders download ImageNet backbone weights by
        # default; fresh weights mean none of them.
        kwargs.setdefault("weights_backbone", None)
    try:
        return tvm.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except OSError as e:
        raise _download_error(f"torchvision:{name}", e) from e


def _from_file(spec: str, **kwargs: Any) -> nn.Module:
    file, _, factory = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise ModelLoadError(f"model file {file!r} not found (expected path/to/file.py:factory)")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelLoadError(f"cannot import {file!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ModelLoadError(f"importing {file!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ModelLoadError(f"{file!r} has no callable {factory!r} (callables there: {', '.join(found) or 'none'})")
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def create_model(spec: str, pretrained: bool = False, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the model named by ``spec``, and record how (``retrofit.save`` and fine-tuning
    checkpoints of a retrofit of it then know which model to build again).

    Args:
        spec: a timm model name (``resnet50``), ``hf-hub:org/name`` (a timm model on the
            Hugging Face Hub: a base model; a retrofit save on the Hub is read by
            :func:`retrofit.load`), ``torchvision:NAME``, or ``path/to/file.py:factory`` for a
            user's own model.
        pretrained: download pretrained weights (needs the network).
        num_classes: classifier size, where the model takes it.
        kwargs: further arguments for the model's constructor or factory.

    Raises:
        ModelLoadError: the name is unknown (with the closest names), a file or factory is
            missing, or weights cannot be downloaded.
    """
    if pretrained and is_file_spec(spec):
        raise ModelLoadError(f"--pretrained needs a timm or torchvision model; {spec!r} is a file (use --checkpoint)")
    args = dict(kwargs) if num_classes is None else {**kwargs, "num_classes": num_classes}
    if spec.startswith("torchvision:"):
        model = _torchvision(spec.split(":", 1)[1], pretrained, **args)
    elif is_file_spec(spec.removeprefix("timm:")):
        spec = spec.removeprefix("timm:")
        model = _from_file(spec, **args)
    else:
        model = _timm(spec.removeprefix("timm:"), pretrained, **args)
    attach_recipe(model, Recipe().with_model(spec, args))
    return model
