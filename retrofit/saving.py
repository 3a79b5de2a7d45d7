"""The files retrofit writes and reads: saves of retrofitted models and fine-tuning checkpoints.

A **save** is one ``.safetensors`` file whose metadata holds the recipe, or a folder with
``model.safetensors`` and a readable ``recipe.json``. A **training checkpoint**
(``last.pt`` / ``best.pt``, written by :func:`retrofit.finetune.fit`) holds the recipe,
the weights and everything a resume needs, as plain data and tensors, read with
``torch.load(weights_only=True)``. This module reads and writes the files; building a
model from them (checking trust, then the recipe, then the weights) is :mod:`retrofit.build`.
A folder save in a Hugging Face Hub repository is fetched by :mod:`retrofit.hub` and then
read like any local folder.

Writes are atomic (a temporary file beside the target, then a rename): a failed or
interrupted save leaves nothing behind, and an existing file is only replaced with
``force=True``, which replaces the files a save writes and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from .errors import ModelLoadError, SaveError, first_line
from .recipe import Recipe

__all__ = [
    "FORMAT",
    "TRAIN_FORMAT",
    "WEIGHTS_FILE",
    "RECIPE_FILE",
    "SavedModel",
    "check_save_path",
    "write_save",
    "read_save",
    "read_weights",
    "tensor_sizes",
    "package_versions",
    "buffer_names",
    "save_training_state",
    "load_training_state",
]

FORMAT = "retrofit/2"
TRAIN_FORMAT = "retrofit-train/2"
_OLD_FORMAT, _OLD_TRAIN_FORMAT = "retrofit/1", "retrofit-train/1"
_META_KEY = "retrofit_recipe"
WEIGHTS_FILE, RECIPE_FILE = "model.safetensors", "recipe.json"  # a folder save's two files
# A folder written by transformers' or smp's save_pretrained: the recipe is in its config.
_FRAMEWORK_CONFIG, _CONFIG_RECIPE_KEYS = "config.json", ("retrofit", "_retrofit")
_TRAIN_SUFFIXES = (".pt", ".pth")


def package_versions() -> dict[str, str]:
    """The versions of retrofit and the packages a model is built with, as a file records them."""
    import timm
    import torchvision

    from .version import __version__

    # str(): torch's version is a str subclass that torch.load(weights_only=True) refuses.
    return {"retrofit": str(__version__), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "timm": str(timm.__version__)}


# --------------------------------------------------------------------------- writing


def _umask() -> int:
    status = Path("/proc/self/status")
    if status.is_file():  # Linux: read it without changing it
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(dest: Path, write: Callable[[Path], object]) -> Path:
    """``write`` a temporary file beside ``dest``, with the permissions a new file gets under
    the user's umask (safetensors writes 0600); return it (the caller renames it)."""
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def buffer_names(model: nn.Module) -> list[str]:
    """Names of the state dict's entries that are buffers, not parameters (files record them
    so that parameters can be counted from a file alone)."""
    params = {id(p) for p in model.parameters()}
    return sorted(n for n, b in model.state_dict(keep_vars=True).items() if id(b) not in params)


def check_save_path(path: Path, force: bool) -> tuple[Path, bool]:
    """Where a save goes (its folder must exist) and whether it is one file.

    Raises:
        SaveError: the path exists (without ``force``), is of the other kind, or its folder
            does not exist.
    """
    if path.exists() and not force:
        raise SaveError(f"{str(path)!r} exists; not overwriting it (pass --force / force=True to replace it)")
    is_file = path.suffix == ".safetensors"
    if path.exists() and path.is_dir() == is_file:
        kind = "a folder" if path.is_dir() else "a file"
        raise SaveError(f"cannot save to {str(path)!r}: it is {kind}; a save is a .safetensors file or a folder")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SaveError(f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    return parent, is_file


def write_save(model: nn.Module, path: Path, recipe: Recipe) -> Path:
    """Write ``model``'s weights and ``recipe`` as a save at ``path`` (checked by
    :func:`check_save_path`), atomically: a failed or interrupted write leaves nothing."""
    parent, is_file = check_save_path(path, force=True)
    header = {
        "format": FORMAT,
        "recipe": recipe.located(parent if is_file else path).to_dict(),
        "versions": package_versions(),
        # Names of the saved tensors that are buffers, so `retrofit diff` can count
        # parameters from the file alone.
        "buffers": buffer_names(model),
    }
    meta = {_META_KEY: json.dumps(header)}
    created = False
    temps: list[tuple[Path, Path]] = []
    try:
        if is_file:
            temps.append((_atomic(path, lambda t: save_model(model, str(t), metadata=meta)), path))
        else:
            if not path.exists():
                path.mkdir()
                created = True
            temps.append((_atomic(path / WEIGHTS_FILE, lambda t: save_model(model, str(t), metadata=meta)),
                          path / WEIGHTS_FILE))
            temps.append((_atomic(path / RECIPE_FILE, lambda t: t.write_text(json.dumps(header, indent=2) + "\n")),
                          path / RECIPE_FILE))
        for tmp, dest in temps:
            os.replace(tmp, dest)
    except (OSError, SafetensorError) as e:  # safetensors reports its own I/O errors
        raise SaveError(f"cannot write {str(path)!r}: {getattr(e, 'strerror', None) or first_line(e)}") from e
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        if created and not (path / RECIPE_FILE).exists():
            shutil.rmtree(path, ignore_errors=True)
    return path


def save_training_state(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write a training checkpoint (``payload`` plus the format tag) atomically.

    In a distributed run only rank 0 calls this.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(_atomic(path, lambda t: torch.save({"format": TRAIN_FORMAT, **payload}, t)), path)
    return path


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class SavedModel:
    """What a save or a training checkpoint says about itself, read without building anything."""

    path: Path  # the file or folder
    kind: str  # "file" (.safetensors), "folder", or "checkpoint" (a fine-tuning last.pt / best.pt)
    recipe: Recipe  # how to build the model (a model file's path is relative to `folder`)
    folder: Path  # what a model file's path in the recipe is relative to
    versions: Mapping[str, str]  # package versions it was written with
    buffers: tuple[str, ...]  # names of saved tensors that are buffers (saves only)
    checkpoint: Mapping[str, Any] | None = None  # the training checkpoint's contents (checkpoints only)


def load_training_state(path: str | Path, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_training_state` (``weights_only=True``).

    Raises:
        ModelLoadError: the file is missing or is not a retrofit training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"training checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"cannot read training checkpoint {str(path)!r} ({type(e).__name__} in torch.load); "
            "expected a last.pt or best.pt written by retrofit.finetune.fit"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (TRAIN_FORMAT, _OLD_TRAIN_FORMAT):
        raise ModelLoadError(
            f"{str(path)!r} is not a retrofit training checkpoint (expected format {TRAIN_FORMAT!r}); "
            "it must come from retrofit.finetune.fit (last.pt or best.pt)"
        )
    return ckpt


def _recipe_of_old_save(old: Mapping[str, Any], where: str) -> Recipe:
    """A ``retrofit/1`` save's recipe (retrofit 0.1): the same facts, another layout."""
    try:
        opts, model = old["retrofit"], old["model"]
        return Recipe.from_dict({
            "model": model["spec"], "model_kwargs": model.get("kwargs", {}), "rules": opts["rules"]["doc"],
            "rules_name": opts["rules"]["name"], "gate": opts.get("gate"), "attn_args": opts.get("attn_args") or {},
            "input_size": opts["input_size"], "leaf_modules": opts.get("leaf_modules", []),
            "on_existing": opts.get("on_existing"), "fuse": opts.get("fuse", True),
            "keep_class": opts.get("keep_class", False),
        }, where)
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{where}: its {_OLD_FORMAT} recipe lacks {e}") from e


def _recipe_of_old_checkpoint(spec: Mapping[str, Any], where: str) -> Recipe:
    """A ``retrofit-train/1`` checkpoint's model spec (retrofit 0.1): a model, a rule set
    named by ``attn`` or a rule file path, and the options."""
    import tomllib

    from .rulefile import builtin_rules_dir, default_rules_doc

    rules_doc: Mapping[str, Any] | None = None
    if spec.get("retrofitted", True):
        if spec.get("rules"):
            try:
                rules_doc = tomllib.loads(Path(spec["rules"]).read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ModelLoadError(f"{where}: its rule file {spec['rules']!r} cannot be read: {e}") from e
        else:
            builtin = builtin_rules_dir() / f"{spec.get('attn')}.toml"
            rules_doc = (tomllib.loads(builtin.read_text(encoding="utf-8")) if builtin.is_file()
                         else default_rules_doc(str(spec.get("attn"))))
    return Recipe.from_dict({
        "model": spec.get("model"), "model_kwargs": spec.get("model_kwargs") or {}, "rules": rules_doc,
        "rules_name": spec.get("rules") or f"built-in {spec.get('attn')!r}", "gate": spec.get("gate"),
        "attn_args": spec.get("attn_args") or {}, "input_size": spec.get("input_size"),
        "fuse": spec.get("fuse", True), "keep_class": spec.get("keep_class", False),
    }, where)


def read_save(path: str | Path, where: str | None = None) -> SavedModel:
    """What a save (``.safetensors`` file or folder) or a training checkpoint (``.pt``) on
    this machine holds, without building or importing anything (a Hub save is fetched by
    :func:`retrofit.hub.download` first). ``where``: how messages name it (default the path).

    Raises:
        ModelLoadError: missing, corrupted, or not written by retrofit.
    """
    where = str(path) if where is None else where
    path = Path(path)
    if path.suffix in _TRAIN_SUFFIXES:
        ckpt = load_training_state(path)
        if ckpt["format"] == _OLD_TRAIN_FORMAT:
            if ckpt.get("spec") is None:
                raise ModelLoadError(f"{where!r} has no model spec; it cannot be rebuilt")
            recipe = _recipe_of_old_checkpoint(ckpt["spec"], where)
        elif ckpt.get("recipe") is None:
            raise ModelLoadError(f"{where!r} has no recipe: it was fine-tuned from a model retrofit() did not "
                                 "build; build that model again and load ckpt['model'] into it")
        else:
            recipe = Recipe.from_dict(ckpt["recipe"], where)
        return SavedModel(path, "checkpoint", recipe, path.parent, ckpt.get("versions") or {},
                          tuple(ckpt.get("buffers") or ()), ckpt)
    files = _weight_files(path) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ModelLoadError(f"no saved model at {where!r} (expected a .safetensors file, a folder with "
                             f"{WEIGHTS_FILE}, or a training checkpoint .pt)")
    weights = files[0]
    try:
        if path.is_dir() and not (path / RECIPE_FILE).exists() and (path / _FRAMEWORK_CONFIG).is_file():
            header = _framework_header(path, where)
        elif path.is_dir():
            header = json.loads((path / RECIPE_FILE).read_text())
        else:
            with safe_open(str(weights), "pt") as f:
                meta = f.metadata() or {}
            if _META_KEY not in meta:
                raise ModelLoadError(
                    f"{where!r} is a safetensors file without a retrofit recipe; load plain weights "
                    "with --checkpoint into the model they belong to"
                )
            header = json.loads(meta[_META_KEY])
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot read saved model {where!r} (corrupted?): {first_line(e)}") from e
    fmt = header.get("format") if isinstance(header, dict) else None
    if fmt == _OLD_FORMAT:
        recipe = _recipe_of_old_save(header, where)
    elif fmt == FORMAT:
        recipe = Recipe.from_dict(header.get("recipe"), where)
    else:
        raise ModelLoadError(f"{where!r}: unknown recipe format {fmt!r} (this retrofit reads {FORMAT!r})")
    return SavedModel(path, "folder" if path.is_dir() else "file", recipe, path if path.is_dir() else path.parent,
                      header.get("versions") or {}, tuple(header.get("buffers") or ()))


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a save folder: ``model.safetensors``, or the shards a
    ``model.safetensors.index.json`` lists (a large ``save_pretrained`` folder)."""
    index = folder / f"{WEIGHTS_FILE}.index.json"
    if not (folder / WEIGHTS_FILE).exists() and index.is_file():
        try:
            names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"cannot read {str(index)!r} (corrupted?): {first_line(e)}") from e
        return [folder / n for n in dict.fromkeys(names) if isinstance(n, str) and "/" not in n]
    return [folder / WEIGHTS_FILE]


def _framework_header(folder: Path, where: str) -> dict[str, Any]:
    """The header of a folder a library's own ``save_pretrained`` wrote for a retrofitted
    model: its ``config.json`` carries the recipe (transformers under ``retrofit``, smp under
    ``_retrofit``; see :mod:`retrofit.frameworks`)."""
    config = json.loads((folder / _FRAMEWORK_CONFIG).read_text(encoding="utf-8"))
    recipe = next((config[k] for k in _CONFIG_RECIPE_KEYS if isinstance(config, dict) and k in config), None)
    if recipe is None:
        raise ModelLoadError(
            f"{where!r} holds a {_FRAMEWORK_CONFIG} without a retrofit recipe: it was saved from a model that was not "
            "retrofitted (load it with its library's from_pretrained), or from a retrofit result that did not keep "
            "its class (save that with retrofit.save)"
        )
    return {"format": FORMAT, "recipe": recipe, "versions": {}, "buffers": []}


def tensor_sizes(path: str | Path) -> dict[str, int]:
    """``{tensor name: number of elements}`` of a save on this machine (read from the file
    header only) or of a training checkpoint's weights."""
    path = Path(path)
    if path.suffix in _TRAIN_SUFFIXES:
        return {k: v.numel() for k, v in load_training_state(path)["model"].items()}
    sizes: dict[str, int] = {}
    try:
        for weights in _weight_files(path) if path.is_dir() else [path]:
            with safe_open(str(weights), "pt") as f:
                sizes.update({k: _numel(f.get_slice(k).get_shape()) for k in f.keys()})
        return sizes
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read saved model {str(path)!r} (corrupted?): {first_line(e)}") from e


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_weights(saved: SavedModel) -> dict[str, torch.Tensor]:
    """The weights of a save or checkpoint :func:`read_save` read (on the CPU).

    Raises:
        ModelLoadError: the weights file is corrupted.
    """
    if saved.checkpoint is not None:
        return {k: v.cpu() for k, v in saved.checkpoint["model"].items()}
    try:
        state: dict[str, torch.Tensor] = {}
        for file in _weight_files(saved.path) if saved.kind == "folder" else [saved.path]:
            state.update(load_file(str(file)))
        return state
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"cannot read saved model {str(saved.path)!r} (corrupted?): {first_line(e)}") from e
