"""Saving and loading retrofitted models: weights plus a recipe, no pickled code.

A save is either one ``.safetensors`` file whose metadata holds the recipe, or a
directory with ``model.safetensors`` and a readable ``recipe.json``. The recipe names the
model (timm name, ``torchvision:NAME`` or ``file.py:factory``), the rules and options
``retrofit()`` ran with, and the package versions. :func:`load` builds the model again,
re-runs the same rewrite and loads the weights, so outputs are bit-identical. Writes are
atomic: a failed or interrupted save leaves no partial file, and an existing file is
only replaced with ``force=True``.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from .errors import ModelLoadError, OptionError, SaveError

__all__ = ["FORMAT", "save", "load", "read_recipe", "tensor_sizes"]

FORMAT = "retrofit/1"
_META_KEY = "retrofit_recipe"
_WEIGHTS, _RECIPE = "model.safetensors", "recipe.json"


def _versions() -> dict[str, str]:
    import timm
    import torchvision

    from . import __version__

    return {"retrofit": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__}


def _model_spec(gm: torch.fx.GraphModule, model_spec: str | None, model_kwargs: dict[str, Any] | None
                ) -> dict[str, Any]:
    kwargs = dict(model_kwargs or {})
    if model_spec is None:
        arch = (getattr(gm, "pretrained_cfg", None) or {}).get("architecture")
        if not arch:
            raise OptionError(
                f"cannot tell which model {type(gm).__name__} was built from; pass "
                "model_spec='resnet50' (timm), 'torchvision:resnet50' or 'path/to/file.py:factory'"
            )
        model_spec = arch
        if isinstance(getattr(gm, "num_classes", None), int):
            kwargs.setdefault("num_classes", gm.num_classes)
    return {"spec": model_spec, "kwargs": kwargs}


def _recipe(gm: torch.fx.GraphModule, model_spec: str | None, model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    from .api import RECIPE_KEY, retrofit_meta

    options = retrofit_meta(gm).get(RECIPE_KEY)
    if options is None:
        raise OptionError(f"{type(gm).__name__} did not come from retrofit(); only retrofitted models can be saved")
    params = {id(p) for p in gm.parameters()}
    return {
        "format": FORMAT,
        "model": _model_spec(gm, model_spec, model_kwargs),
        "retrofit": options,
        "versions": _versions(),
        # Names of the saved tensors that are buffers, so `retrofit diff` can count
        # parameters from the file alone.
        "buffers": sorted(n for n, b in gm.state_dict(keep_vars=True).items() if id(b) not in params),
    }


def _write_file(gm: torch.fx.GraphModule, dest: Path, recipe: dict[str, Any]) -> None:
    save_model(gm, str(dest), metadata={_META_KEY: json.dumps(recipe)})


def save(
    gm: torch.fx.GraphModule,
    path: str | Path,
    *,
    model_spec: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Save a retrofitted model: weights plus the recipe to rebuild it.

    Args:
        gm: a model returned by :func:`retrofit.retrofit`.
        path: ``name.safetensors`` (one file) or a directory (``model.safetensors`` +
            ``recipe.json``).
        model_spec: what to build the model from on load; timm models know their own name.
        model_kwargs: constructor arguments for the model (``num_classes``, ``in_chans``, ...).
        force: replace an existing file or directory.

    Returns:
        The path written.

    Raises:
        SaveError: the path exists (without ``force``) or cannot be written.
        OptionError: the model's origin is unknown (pass ``model_spec``).
    """
    path = Path(path)
    recipe = _recipe(gm, model_spec, model_kwargs)
    if path.exists() and not force:
        raise SaveError(f"{str(path)!r} exists; not overwriting it (pass --force / force=True to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SaveError(f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise SaveError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    try:
        if path.suffix == ".safetensors":
            _write_file(gm, tmp / path.name, recipe)
            os.replace(tmp / path.name, path)
        else:
            _write_file(gm, tmp / _WEIGHTS, recipe)
            (tmp / _RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
            if path.exists():
                old = parent / f".{path.name}.old-{os.getpid()}"
                path.rename(old)
                tmp.rename(path)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            else:
                tmp.rename(path)
    except OSError as e:
        raise SaveError(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _weights_file(path: Path) -> Path:
    return path / _WEIGHTS if path.is_dir() else path


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe of a saved model (file or directory).

    Raises:
        ModelLoadError: missing, corrupted, or not saved by retrofit.
    """
    path = Path(path)
    weights = _weights_file(path)
    if not weights.is_file():
        raise ModelLoadError(f"no saved model at {str(path)!r} (expected a .safetensors file or a folder with {_WEIGHTS})")
    try:
        if path.is_dir():
            recipe = json.loads((path / _RECIPE).read_text())
        else:
            with safe_open(str(weights), "pt") as f:
                meta = f.metadata() or {}
            if _META_KEY not in meta:
                raise ModelLoadError(
                    f"{str(path)!r} is a safetensors file without a retrofit recipe; load plain weights "
                    "with --checkpoint into the model they belong to"
                )
            recipe = json.loads(meta[_META_KEY])
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read saved model {str(path)!r} (corrupted?): {e}") from e
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise ModelLoadError(f"{str(path)!r}: unknown recipe format {recipe.get('format') if isinstance(recipe, dict) else None!r} "
                             f"(this retrofit reads {FORMAT!r})")
    return recipe


def tensor_sizes(path: str | Path) -> dict[str, int]:
    """``{tensor name: number of elements}`` of a saved model, read from the file header only."""
    weights = _weights_file(Path(path))
    try:
        with safe_open(str(weights), "pt") as f:
            return {k: _numel(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read saved model {str(path)!r} (corrupted?): {e}") from e


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _leaf(spec: str) -> Any:
    if ":" not in spec:
        return spec
    module, _, qualname = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def load(path: str | Path) -> torch.nn.Module:
    """Rebuild a model saved with :func:`save`; its outputs equal the saved model's bit for bit.

    Raises:
        ModelLoadError: the file is missing, corrupted, or does not match its recipe.
    """
    from .api import retrofit
    from .models import create_model
    from .rulefile import parse_rules

    path = Path(path)
    recipe = read_recipe(path)
    saved = recipe.get("versions", {})
    now = _versions()
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    if changed:
        warnings.warn(f"{path} was saved with other package versions ({', '.join(changed)})", stacklevel=2)
    model = create_model(recipe["model"]["spec"], **recipe["model"].get("kwargs", {}))
    options = recipe["retrofit"]
    rules = parse_rules(options["rules"]["doc"], options["rules"]["name"])
    gm = retrofit(
        model,
        rules=rules,
        gate=options.get("gate"),
        on_existing=options.get("on_existing"),
        fuse=options.get("fuse", True),
        keep_class=options.get("keep_class", False),
        attn_args=options.get("attn_args") or None,
        input_size=tuple(options["input_size"]),
        leaf_modules=[_leaf(s) for s in options.get("leaf_modules", [])],
        verify=False,
        check_identity=False,  # the saved weights replace the init right after
    )
    try:
        missing, unexpected = load_model(gm, str(_weights_file(path)), strict=False)
    except (SafetensorError, RuntimeError) as e:
        raise ModelLoadError(f"weights in {str(path)!r} do not fit the rebuilt model: {str(e).splitlines()[0]}") from e
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {str(path)!r} do not fit the rebuilt model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    return gm
