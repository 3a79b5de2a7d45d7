"""The files retrofit writes and reads: saves of retrofitted models and fine-tuning checkpoints.

A **save** is one ``.safetensors`` file whose metadata holds the recipe, or a folder with
``model.safetensors`` and a readable ``recipe.json``. A **training checkpoint**
(``last.pt`` / ``best.pt``, written by :func:`retrofit.finetune.fit`) holds the recipe,
the weights and everything a resume needs, as plain data and tensors, read with
``torch.load(weights_only=True)``. This module reads and writes the files; building a
model from them (checking trust, then the recipe, then the weights) is :mod:`retrofit.build`.
A folder save in a Hugging Face Hub repository is fetched by :mod:`retrofit.hub` and then
read like any local folder.

Writes go through :mod:`retrofit.atomic`: a new file or folder is staged beside the target
and put in place with one rename, so a failed or interrupted save leaves the previous one
as it was and nothing that blocks the next; an existing save (or a link) is only replaced
with ``force=True``, which replaces the files a save writes and nothing else.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from .atomic import WriteFn, write_file_atomic, write_folder_atomic
from .checkpoint import OLD_TRAIN_FORMAT, TRAIN_FORMAT
from .errors import ModelLoadError, SaveError, first_line
from .frameworks import registered_frameworks
from .readfile import (
    SafetensorsHeader,
    current_limits,
    json_depth,
    open_regular,
    parse_json,
    read_json,
    read_regular,
    read_safetensors_header,
)
from .recipe import Recipe
from .text import excerpt, shorten

__all__ = [
    "WEIGHTS_FILE",
    "RECIPE_FILE",
    "check_save_path",
    "write_save",
    "read_save",
    "read_weights",
    "tensor_sizes",
    "tensor_shapes",
    "package_versions",
    "buffer_names",
    "write_model_files",
    "save_training_state",
    "load_training_state",
]

FORMAT = "retrofit/2"
_OLD_FORMAT = "retrofit/1"
_META_KEY = "retrofit_recipe"
WEIGHTS_FILE, RECIPE_FILE = "model.safetensors", "recipe.json"  # a folder save's two files
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


def buffer_names(model: nn.Module) -> list[str]:
    """Names of the state dict's entries that are buffers, not parameters (files record them
    so that parameters can be counted from a file alone)."""
    params = {id(p) for p in model.parameters()}
    return sorted(n for n, b in model.state_dict(keep_vars=True).items() if id(b) not in params)


def check_save_path(path: Path, force: bool) -> tuple[Path, bool]:
    """Where a save goes (its folder must exist) and whether it is one file. A symbolic
    link at ``path``, even a dangling one, exists; ``force`` replaces the link, not its target.

    Raises:
        SaveError: the path exists (without ``force``), is of the other kind, or its folder
            does not exist.
    """
    exists, link = os.path.lexists(path), path.is_symlink()
    if exists and not force:
        what = " (a symbolic link)" if link else ""
        raise SaveError(f"{str(path)!r} exists{what}; not overwriting it (pass --force / force=True to replace it)")
    is_file = path.suffix == ".safetensors"
    if exists and not link and path.is_dir() == is_file:
        kind = "a folder" if path.is_dir() else "a file"
        raise SaveError(f"cannot save to {str(path)!r}: it is {kind}; a save is a .safetensors file or a folder")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SaveError(f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    return parent, is_file


def write_save(model: nn.Module, path: Path, recipe: Recipe, *, force: bool = False) -> Path:
    """Write ``model``'s weights and ``recipe`` as a save at ``path`` (checked by
    :func:`check_save_path`) with :mod:`retrofit.atomic`: a failed or interrupted write
    leaves the previous save as it was, and without ``force`` the name is claimed
    atomically (of two saves racing for it, one fails with "exists"). A folder save is
    written as a new folder and swapped in; with ``force`` it keeps the old folder's other
    files. A model file the recipe names from elsewhere travels with the save: into the
    folder, or beside a one-file save (:func:`write_model_files`).

    Raises:
        SaveError: the path exists (without ``force``) or cannot be written.
    """
    parent, is_file = check_save_path(path, force)
    located, carried = recipe.located(parent if is_file else path)
    header = {
        "format": FORMAT,
        "recipe": located.to_dict(),
        "versions": package_versions(),
        # Names of the saved tensors that are buffers, so `retrofit diff` can count
        # parameters from the file alone.
        "buffers": buffer_names(model),
    }
    meta = {_META_KEY: json.dumps(header)}

    def weights(t: Path) -> None:
        save_model(model, str(t), metadata=meta)

    try:
        if is_file:
            write_model_files(parent, carried, force=force)
            write_file_atomic(path, weights, replace=force)
        else:
            write_folder_atomic(path, {
                **{name: _writer(data) for name, data in carried.items()},
                WEIGHTS_FILE: weights,
                RECIPE_FILE: lambda t: t.write_text(json.dumps(header, indent=2) + "\n"),
            }, replace=force)
    except SafetensorError as e:  # safetensors reports its own I/O errors
        raise SaveError(f"cannot write {str(path)!r}: {first_line(e)}") from e
    return path


def _writer(data: bytes) -> WriteFn:
    return lambda t: t.write_bytes(data)


def write_model_files(folder: Path, files: Mapping[str, bytes], *, force: bool) -> None:
    """Write the model files a save carries (:meth:`Recipe.located`) into ``folder``: beside
    a one-file save, or into a training run's folder. A file already there with the same
    bytes is kept; another one is replaced only with ``force``.

    Raises:
        SaveError: a file of that name is there (without ``force``) or cannot be written.
    """
    for name, data in files.items():
        target = folder / name
        if target.is_file() and not target.is_symlink() and target.read_bytes() == data:
            continue
        if os.path.lexists(target) and not force:
            raise SaveError(f"cannot carry the model file into the save: {str(target)!r} exists and holds other "
                            "bytes; not overwriting it (pass --force / force=True to replace it, or save into a "
                            "folder of its own)")
        write_file_atomic(target, _writer(data), replace=force)


def save_training_state(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write a training checkpoint (``payload`` plus the format tag) atomically, replacing
    the previous one (:func:`retrofit.atomic.write_file_atomic`).

    In a distributed run only rank 0 calls this.

    Raises:
        SaveError: it cannot be written (the previous checkpoint is then left as it was).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file_atomic(path, lambda t: torch.save({"format": TRAIN_FORMAT, **payload}, t), replace=True)


# --------------------------------------------------------------------------- reading
#
# Every file is read through retrofit.readfile: regular files only (a FIFO or /dev/zero is
# refused, never waited on or read), under the size caps of its Limits; JSON with a cap on
# its nesting. Every field is checked for its type, so that a damaged or hostile file is a
# ModelLoadError naming the file and the field, never another exception.


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
    header: SafetensorsHeader | None = None  # a one-file save's header, read with its recipe (not read again)


def _check_zip_expansion(f: Any, size: int, what: str) -> None:
    """Refuse a zip checkpoint whose records expand far past the file's size (torch.save
    stores them uncompressed); read from the zip's directory, nothing is inflated."""
    import zipfile

    limits = current_limits()
    if f.read(4) != b"PK\x03\x04":
        f.seek(0)
        return
    try:
        with zipfile.ZipFile(f) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        total = 0  # torch.load says what is wrong with it
    f.seek(0)
    if total > size * limits.checkpoint_expansion + (1 << 20):
        raise ModelLoadError(f"cannot read {what}: its records expand to {total} bytes from {size} (over "
                             f"Limits.checkpoint_expansion = {limits.checkpoint_expansion}); torch.save writes "
                             "them uncompressed, so it is not a checkpoint retrofit wrote")


def _unreadable_checkpoint(what: str, e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file: a library's own checkpoint (an
    Ultralytics ``.pt`` is a pickle of the model, which runs code when read) is named as
    such, with the way to read it."""
    pickled = re.search(r"GLOBAL (([\w]+)\.[\w.]+)", str(e))
    native = next((f for f in registered_frameworks() if pickled and f.native_suffix and f.package == pickled[2]),
                  None)
    if pickled and native is not None:
        return (f"cannot read {what}: it is {native.native_format} (a pickle of {pickled[1]}, which runs code when "
                "read), not a retrofit save or fine-tuning checkpoint; read it with trust: "
                f"retrofit.create_model('{native.prefix}:PATH', trust_code=True), then retrofit.get_report(model) "
                "gives its diff, and retrofit.save(model, 'NAME.safetensors') a save this command reads")
    return (f"cannot read {what} ({type(e).__name__} in torch.load: {shorten(first_line(e), 200)}); "
            "expected a last.pt or best.pt written by retrofit.finetune.fit")


def load_training_state(path: str | Path, map_location: str | torch.device | None = None) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_training_state` (``weights_only=True``):
    a regular file under ``Limits.weights_bytes``.

    Raises:
        ModelLoadError: the file is missing, unreadable, or is not a retrofit training checkpoint.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise ModelLoadError(f"training checkpoint {str(path)!r} not found")
    what = f"training checkpoint {str(path)!r}"
    with open_regular(path, what, current_limits().weights_bytes, "weights_bytes") as (f, size):
        _check_zip_expansion(f, size, what)
        try:
            ckpt = torch.load(f, map_location=map_location or "cpu", weights_only=True)
        except MemoryError as e:
            raise ModelLoadError(f"cannot read {what}: it does not fit in memory; is it corrupted?") from e
        except Exception as e:
            raise ModelLoadError(_unreadable_checkpoint(what, e)) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (TRAIN_FORMAT, OLD_TRAIN_FORMAT):
        raise ModelLoadError(
            f"{str(path)!r} is not a retrofit training checkpoint (expected format {TRAIN_FORMAT!r}); "
            "it must come from retrofit.finetune.fit (last.pt or best.pt)"
        )
    return ckpt


def _checkpoint_state(ckpt: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    """A training checkpoint's weights (its ``model`` entry), checked: tensors by name."""
    state = ckpt.get("model")
    if not isinstance(state, Mapping):
        got = "no 'model' entry" if state is None else f"a 'model' entry that is a {type(state).__name__}"
        raise ModelLoadError(f"{where!r}: the checkpoint has {got}, not the model's weights (a table of tensors); "
                             "it was not written by retrofit.finetune.fit")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ModelLoadError(f"{where!r}: the checkpoint's 'model' entry {excerpt(k, 60)} is a {type(v).__name__}, "
                                 "not a tensor; it was not written by retrofit.finetune.fit")
    return dict(state)


def _versions(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ModelLoadError(f"{where!r}: field 'versions' is a {type(value).__name__} ({excerpt(value, 60)}), not a "
                             "table of package versions ({\"torch\": \"2.4.0\", ...})")
    bad = next(((k, v) for k, v in value.items() if not isinstance(k, str) or not isinstance(v, str)), None)
    if bad is not None:
        raise ModelLoadError(f"{where!r}: field 'versions' gives {excerpt(bad[0], 40)} the {type(bad[1]).__name__} "
                             f"{excerpt(bad[1], 40)}, not a version string")
    return dict(value)


def _buffers(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ModelLoadError(f"{where!r}: field 'buffers' is a {type(value).__name__} ({excerpt(value, 60)}), not a "
                             "list of tensor names")
    bad = next((v for v in value if not isinstance(v, str)), None)
    if bad is not None:
        raise ModelLoadError(f"{where!r}: field 'buffers' holds the {type(bad).__name__} {excerpt(bad, 40)}, not a "
                             "tensor name")
    return tuple(value)


def _recipe_of(value: Any, where: str) -> Recipe:
    """:meth:`Recipe.from_dict` of plain data from a file, its nesting checked first (a
    checkpoint's data comes from pickle, which nests without recursing)."""
    limit = current_limits().json_depth
    if json_depth(value, limit) > limit:
        raise ModelLoadError(f"{where!r}: its recipe nests deeper than the limit of {limit} (Limits.json_depth); "
                             "it is not a file retrofit wrote")
    return Recipe.from_dict(value, where)


def _recipe_of_old_save(old: Mapping[str, Any], where: str) -> Recipe:
    """A ``retrofit/1`` save's recipe (retrofit 0.1): the same facts, another layout."""
    try:
        opts, model = old["retrofit"], old["model"]
        return _recipe_of({
            "model": model["spec"], "model_kwargs": model.get("kwargs", {}), "rules": opts["rules"]["doc"],
            "rules_name": opts["rules"]["name"], "gate": opts.get("gate"), "attn_args": opts.get("attn_args") or {},
            "input_size": opts["input_size"], "leaf_modules": opts.get("leaf_modules", []),
            "on_existing": opts.get("on_existing"), "fuse": opts.get("fuse", True),
            "keep_class": opts.get("keep_class", False),
        }, where)
    except KeyError as e:
        raise ModelLoadError(f"{where}: its {_OLD_FORMAT} recipe lacks {e}") from e
    except (TypeError, AttributeError) as e:
        raise ModelLoadError(f"{where}: its {_OLD_FORMAT} recipe is malformed ({first_line(e)})") from e


def _old_rule_file(name: Any, folder: Path, where: str) -> Any:
    """The rule file an old checkpoint names, read from the checkpoint's own folder only
    (never relative to the current folder, through ``..`` or a link that leads out)."""
    import tomllib

    if not isinstance(name, str):
        raise ModelLoadError(f"{where}: its rule file {excerpt(name, 60)} is not a file name")
    rel = PurePath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ModelLoadError(f"{where}: its rule file {name!r} lies outside the checkpoint's folder; an old "
                             f"checkpoint's rule file is read from beside it: copy it into {str(folder)!r} and "
                             "name it there")
    path = folder / rel
    inside = Path(os.path.realpath(folder))
    if not Path(os.path.realpath(path)).is_relative_to(inside):
        raise ModelLoadError(f"{where}: its rule file {name!r} leads outside the checkpoint's folder (a link); copy "
                             f"the file into {str(folder)!r}")
    what = f"{where}'s rule file {name!r}"
    data = read_regular(path, what, current_limits().json_bytes, "json_bytes")
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as e:
        raise ModelLoadError(f"cannot read {what}: {first_line(e)}") from e
    return doc


def _recipe_of_old_checkpoint(spec: Any, where: str, folder: Path) -> Recipe:
    """A ``retrofit-train/1`` checkpoint's model spec (retrofit 0.1): a model, a rule set
    named by ``attn`` or a rule file (beside the checkpoint, in ``folder``), and the options."""
    import tomllib

    from .rulefile import builtin_rules_dir, default_rules_doc

    if not isinstance(spec, Mapping):
        raise ModelLoadError(f"{where!r}: its model spec is a {type(spec).__name__}, not a table")
    rules_doc: Any = None
    attn = spec.get("attn")
    if spec.get("retrofitted", True):
        if spec.get("rules"):
            rules_doc = _old_rule_file(spec["rules"], folder, where)
        elif isinstance(attn, str) and re.fullmatch(r"[A-Za-z0-9_][\w-]*", attn) \
                and (builtin := builtin_rules_dir() / f"{attn}.toml").is_file():
            rules_doc = tomllib.loads(builtin.read_text(encoding="utf-8"))
        else:
            rules_doc = default_rules_doc(str(attn))
    try:
        return _recipe_of({
            "model": spec.get("model"), "model_kwargs": spec.get("model_kwargs") or {}, "rules": rules_doc,
            "rules_name": str(spec.get("rules") or f"built-in {attn!r}"), "gate": spec.get("gate"),
            "attn_args": spec.get("attn_args") or {}, "input_size": spec.get("input_size"),
            "fuse": spec.get("fuse", True), "keep_class": spec.get("keep_class", False),
        }, where)
    except (TypeError, AttributeError) as e:
        raise ModelLoadError(f"{where}: its {OLD_TRAIN_FORMAT} model spec is malformed ({first_line(e)})") from e


def read_save(path: str | Path, where: str | None = None) -> SavedModel:
    """What a save (``.safetensors`` file or folder) or a training checkpoint (``.pt``) on
    this machine holds, without building or importing anything (a Hub save is fetched by
    :func:`retrofit.hub.download` first). ``where``: how messages name it (default the path).
    Files are read under :func:`retrofit.readfile.current_limits`.

    Raises:
        ModelLoadError: missing, unreadable, not a regular file, over a limit, corrupted,
            or not written by retrofit.
    """
    where = str(path) if where is None else where
    try:
        return _read_save(Path(path), where)
    except MemoryError as e:
        raise ModelLoadError(f"cannot read saved model {where!r}: it asks for more memory than there is; is it "
                             "corrupted?") from e
    except RecursionError as e:
        raise ModelLoadError(f"cannot read saved model {where!r}: its recipe nests too deeply; it is not a file "
                             "retrofit wrote") from e


def _no_save(where: str) -> ModelLoadError:
    return ModelLoadError(f"no saved model at {where!r} (expected a .safetensors file, a folder with "
                          f"{WEIGHTS_FILE}, or a training checkpoint .pt)")


def _read_save(path: Path, where: str) -> SavedModel:
    if path.suffix in _TRAIN_SUFFIXES:
        return _read_checkpoint(path, where)
    if not os.path.lexists(path):
        raise _no_save(where)
    st = None
    if path.is_dir():
        header = _folder_header(path, where)
    else:
        st = read_safetensors_header(path, f"saved model {where!r}")
        if _META_KEY not in st.metadata:
            raise ModelLoadError(
                f"{where!r} is a safetensors file without a retrofit recipe; load plain weights "
                "with --checkpoint into the model they belong to"
            )
        header = parse_json(st.metadata[_META_KEY], f"saved model {where!r} (its recipe)")
    fmt = header.get("format") if isinstance(header, dict) else None
    if fmt == _OLD_FORMAT:
        recipe = _recipe_of_old_save(header, where)
    elif fmt == FORMAT:
        recipe = _recipe_of(header.get("recipe"), where)
    else:
        raise ModelLoadError(f"{where!r}: unknown recipe format {excerpt(fmt, 60)} (this retrofit reads {FORMAT!r})")
    return SavedModel(path, "folder" if st is None else "file", recipe, path if st is None else path.parent,
                      _versions(header.get("versions"), where), _buffers(header.get("buffers"), where), header=st)


def _read_checkpoint(path: Path, where: str) -> SavedModel:
    """A training checkpoint (``last.pt`` / ``best.pt``), read once and kept whole."""
    ckpt = load_training_state(path)
    _checkpoint_state(ckpt, where)
    if ckpt["format"] == OLD_TRAIN_FORMAT:
        if ckpt.get("spec") is None:
            raise ModelLoadError(f"{where!r} has no model spec; it cannot be rebuilt")
        recipe = _recipe_of_old_checkpoint(ckpt["spec"], where, path.parent)
    elif ckpt.get("recipe") is None:
        raise ModelLoadError(f"{where!r} has no recipe: it was fine-tuned from a model retrofit() did not "
                             "build; build that model again and load ckpt['model'] into it")
    else:
        recipe = _recipe_of(ckpt["recipe"], where)
    return SavedModel(path, "checkpoint", recipe, path.parent, _versions(ckpt.get("versions"), where),
                      _buffers(ckpt.get("buffers"), where), ckpt)


def _folder_header(path: Path, where: str) -> Any:
    """A save folder's header: its ``recipe.json``, or the recipe in the config a library's
    own ``save_pretrained`` wrote."""
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelLoadError(f"cannot read saved model {where!r}: permission denied (the folder); check its "
                             "permissions")
    if not all(os.path.lexists(f) for f in _weight_files(path, where)):
        raise _no_save(where)
    config = next((path / f for f in _config_files() if os.path.lexists(path / f)), None)
    if not os.path.lexists(path / RECIPE_FILE) and config is not None:
        return _framework_header(config, where)
    return read_json(path / RECIPE_FILE, f"saved model {where!r} ({RECIPE_FILE})")


def _weight_files(folder: Path, where: str | None = None) -> list[Path]:
    """The weight files of a save folder: ``model.safetensors``, or the shards a
    ``model.safetensors.index.json`` lists (a large ``save_pretrained`` folder), each a
    file name in the folder."""
    index = folder / f"{WEIGHTS_FILE}.index.json"
    where = str(folder) if where is None else where
    if os.path.lexists(folder / WEIGHTS_FILE) or not os.path.lexists(index):
        return [folder / WEIGHTS_FILE]
    what = f"saved model {where!r} ({index.name})"
    weight_map = read_json(index, what)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"cannot read {what} (corrupted?): it has no 'weight_map' table")
    names = list(dict.fromkeys(weight_map.values()))
    for n in names:
        if not isinstance(n, str) or not n or n in (".", "..") or "/" in n or "\\" in n or "\0" in n:
            raise ModelLoadError(f"cannot read {what}: its weight_map names {excerpt(n, 60)}, not a file in the folder")
    return [folder / n for n in names]


def _config_files() -> list[str]:
    """The config files libraries' own ``save_pretrained`` write (``config.json``)."""
    return sorted({f.config_file for f in registered_frameworks() if f.config_file})


def _framework_header(file: Path, where: str) -> dict[str, Any]:
    """The header of a folder a library's own ``save_pretrained`` wrote for a retrofitted
    model: its config ``file`` carries the recipe under the key its adapter declares
    (:attr:`retrofit.frameworks.Framework.config_key`)."""
    config = read_json(file, f"saved model {where!r} ({file.name})")
    keys = [f.config_key for f in registered_frameworks() if f.config_key and f.config_file == file.name]
    recipe = next((config[k] for k in keys if isinstance(config, dict) and k in config), None)
    if recipe is None:
        raise ModelLoadError(
            f"{where!r} holds a {file.name} without a retrofit recipe: it was saved from a model that was not "
            "retrofitted (load it with its library's from_pretrained), or from a retrofit result that did not keep "
            "its class (save that with retrofit.save)"
        )
    return {"format": FORMAT, "recipe": recipe, "versions": {}, "buffers": []}


def _headers(path: Path, where: str) -> list[tuple[Path, SafetensorsHeader]]:
    """The checked safetensors header of each weight file of a save (file or folder)."""
    if not path.is_dir():
        return [(path, read_safetensors_header(path, f"saved model {where!r}"))]
    return [(f, read_safetensors_header(f, f"saved model {where!r} ({f.name})")) for f in _weight_files(path, where)]


def tensor_shapes(saved: SavedModel) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` of the weights a save or checkpoint :func:`read_save` read:
    from the safetensors headers alone (checked against the files' sizes), nothing loaded.

    Raises:
        ModelLoadError: a weights file is missing, over a limit or corrupted.
    """
    if saved.checkpoint is not None:
        return {k: tuple(v.shape) for k, v in _checkpoint_state(saved.checkpoint, str(saved.path)).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    headers = [(saved.path, saved.header)] if saved.header is not None else _headers(saved.path, str(saved.path))
    for _, header in headers:
        shapes.update({k: e.shape for k, e in header.tensors.items()})
    return shapes


def tensor_sizes(source: str | Path | SavedModel) -> dict[str, int]:
    """``{tensor name: number of elements}`` of a save on this machine (read from the file
    header only) or of a training checkpoint's weights; of a :class:`SavedModel`, from what
    :func:`read_save` read (a checkpoint is not read again)."""
    if isinstance(source, SavedModel):
        return {k: _numel(shape) for k, shape in tensor_shapes(source).items()}
    path = Path(source)
    if path.suffix in _TRAIN_SUFFIXES:
        return {k: v.numel() for k, v in _checkpoint_state(load_training_state(path), str(path)).items()}
    sizes: dict[str, int] = {}
    for _, header in _headers(path, str(path)):
        sizes.update({k: _numel(e.shape) for k, e in header.tensors.items()})
    return sizes


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def read_weights(saved: SavedModel) -> dict[str, torch.Tensor]:
    """The weights of a save or checkpoint :func:`read_save` read (on the CPU); each file's
    header is checked (:func:`retrofit.readfile.read_safetensors_header`) before it is loaded.

    Raises:
        ModelLoadError: a weights file is missing, over a limit or corrupted.
    """
    if saved.checkpoint is not None:
        return {k: v.cpu() for k, v in _checkpoint_state(saved.checkpoint, str(saved.path)).items()}
    state: dict[str, torch.Tensor] = {}
    for file, _ in _headers(saved.path, str(saved.path)):
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise ModelLoadError(f"cannot read saved model {str(saved.path)!r} (corrupted?): {first_line(e)}") from e
        except MemoryError as e:
            raise ModelLoadError(f"cannot read saved model {str(saved.path)!r}: its weights do not fit in "
                                 "memory") from e
    return state
