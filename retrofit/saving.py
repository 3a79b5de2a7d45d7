"""The files retrofit writes and reads: saves of retrofitted models and fine-tuning checkpoints.

A **save** is one ``.safetensors`` file whose metadata holds the recipe, or a folder with
``model.safetensors`` and a readable ``recipe.json``. A **training checkpoint**
(``last.pt`` / ``best.pt``, written by :func:`retrofit.finetune.fit`) holds the recipe,
the weights and everything a resume needs, as plain data and tensors, read with
``torch.load(weights_only=True)``. :func:`load` reads all three: it checks that the recipe
names no code the caller did not allow (:mod:`retrofit.recipe`), builds the model again
and loads the weights, so outputs are bit-identical, in the saved dtype. A folder save in
a Hugging Face Hub repository, named ``"hf-hub:ORG/NAME"``, is fetched by
:mod:`retrofit.hub` and then read like any local folder.

Writes are atomic (a temporary file beside the target, then a rename): a failed or
interrupted save leaves nothing behind, and an existing file is only replaced with
``force=True``, which replaces the files a save writes and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from .errors import ModelLoadError, OptionError, RetrofitError, SaveError, first_line
from .recipe import Recipe, get_recipe
from .weights import assign_weights

__all__ = [
    "FORMAT",
    "TRAIN_FORMAT",
    "WEIGHTS_FILE",
    "RECIPE_FILE",
    "SavedModel",
    "save",
    "load",
    "read_save",
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

    from . import __version__

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


def _atomic(dest: Path, write: Callable[[Path], None]) -> Path:
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


def _state_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_rebuilds(model: nn.Module, recipe: Recipe) -> None:
    """Build the recipe again (on the meta device: no memory, no init) and compare weights'
    names and shapes, so that a save that could not be loaded is never written.

    Raises:
        OptionError: the recipe builds another model; the message says what differs.
    """
    def explain(what: str) -> OptionError:
        # A library's config or model yaml as an argument is long: its start says enough.
        kwargs = ", ".join(f"{k!r}: {_short_repr(v)}" for k, v in _innermost(recipe).model_kwargs.items())
        return OptionError(
            f"not saved: the recipe (model {_innermost(recipe).model!r}, arguments {{{kwargs}}}) {what}; pass "
            "model_spec='resnet50' (timm), 'torchvision:NAME' or 'path/to/file.py:factory' and model_kwargs "
            "(e.g. {'num_classes': 10, 'in_chans': 1}) to save(), or build the model with retrofit.create_model()"
        )

    def build(step: Callable[[], nn.Module]) -> nn.Module:
        try:
            try:
                with torch.device("meta"):
                    return step()
            except Exception:  # a constructor that needs real values (`.item()`): build it for real
                return step()
        except RetrofitError as e:
            raise explain(f"cannot build the model again ({first_line(e)})") from e
        except Exception as e:
            raise explain(f"cannot build the model again ({type(e).__name__}: {first_line(e)})") from e

    def compare(got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], extra_ok: bool) -> None:
        missing = [k for k in got if k not in want]
        extra = [] if extra_ok else [k for k in want if k not in got]
        shape = [f"{k} {list(got[k])} instead of {list(want[k])}" for k in got if k in want and got[k] != want[k]]
        if missing or extra or shape:
            parts = ([f"has {len(missing)} tensors this one lacks (e.g. {', '.join(missing[:2])})"] if missing else []) + \
                    ([f"lacks {len(extra)} of its tensors (e.g. {', '.join(extra[:2])})"] if extra else []) + \
                    ([f"has {len(shape)} of another shape (e.g. {'; '.join(shape[:2])})"] if shape else [])
            raise explain(f"builds a model that {', '.join(parts)}")

    want = _state_shapes(model)
    base = build(lambda: recipe.build_base())
    # The base model first: a wrong guess of its arguments shows here, named, rather than
    # as a failure somewhere in the rewrite.
    compare(_state_shapes(base), want, extra_ok=True)
    compare(_state_shapes(build(lambda: recipe.apply(base))), want, extra_ok=False)


def _short_repr(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _innermost(recipe: Recipe) -> Recipe:
    while recipe.base is not None:
        recipe = recipe.base
    return recipe


def save(
    model: nn.Module,
    path: str | Path,
    *,
    model_spec: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Save a retrofitted model: weights plus the recipe to build it again.

    Before anything is written, the recipe is built again on the meta device and its
    weights' names and shapes are compared with the model's: a save that could not be
    loaded is never written.

    Args:
        model: a model returned by :func:`retrofit.retrofit` (or :func:`retrofit.load`);
            a deep copy or a pickled and unpickled one works too.
        path: ``name.safetensors`` (one file) or a folder (``model.safetensors`` +
            ``recipe.json``).
        model_spec: the base model, where the model does not know it: built by
            :func:`retrofit.create_model` it does, and a timm model names its architecture.
        model_kwargs: the base model's constructor arguments (``num_classes``, ``in_chans``, ...).
        force: replace an existing file, or the two files of an existing folder save (other
            files in the folder are left alone).

    Returns:
        The path written.

    Raises:
        SaveError: the path exists (without ``force``), cannot be written, or the model is
            on the meta device.
        OptionError: the model did not come from retrofit, or its recipe does not build it
            again (pass ``model_spec`` / ``model_kwargs``).
    """
    path = Path(path)
    recipe = get_recipe(model)
    if recipe is None:
        raise OptionError(f"{type(model).__name__} did not come from retrofit(); only models built by "
                          "retrofit.retrofit(), retrofit.create_model() or retrofit.load() can be saved")
    if model_spec is not None or model_kwargs is not None:
        recipe = recipe.with_model(model_spec, model_kwargs)
    if _innermost(recipe).model is None:
        raise OptionError(
            f"cannot tell which model {type(model).__name__} was built from; pass model_spec='resnet50' (timm), "
            "'torchvision:resnet50' or 'path/to/file.py:factory' (and model_kwargs), or build the model with "
            "retrofit.create_model()"
        )
    if any(t.device.type == "meta" for t in model.state_dict().values()):
        raise SaveError(f"cannot save {type(model).__name__}: it is on the meta device and has no weights; "
                        "build it on a real device (or load its weights) first")
    if path.exists() and not force:
        raise SaveError(f"{str(path)!r} exists; not overwriting it (pass --force / force=True to replace it)")
    is_file = path.suffix == ".safetensors"
    if path.exists() and path.is_dir() == is_file:
        kind = "a folder" if path.is_dir() else "a file"
        raise SaveError(f"cannot save to {str(path)!r}: it is {kind}; a save is a .safetensors file or a folder")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SaveError(f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    _check_rebuilds(model, recipe)
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


def _local(path: str | Path) -> Path:
    """Where a save lies on this machine: ``path`` itself, or for ``"hf-hub:ORG/NAME"`` (a
    string; a ``Path`` is always local) the snapshot folder :func:`retrofit.hub.download`
    fetched it to."""
    from .hub import download, is_hub_save

    return download(path) if is_hub_save(path) else Path(path)


def read_save(path: str | Path) -> SavedModel:
    """What a save (``.safetensors`` file or folder, or ``"hf-hub:ORG/NAME"``) or a training
    checkpoint (``.pt``) holds, without building or importing anything (a Hub save is
    downloaded first, code files included; nothing is run).

    Raises:
        ModelLoadError: missing, corrupted, or not written by retrofit.
    """
    where = str(path)
    path = _local(path)
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
    """``{tensor name: number of elements}`` of a save (read from the file header only) or
    of a training checkpoint's weights."""
    path = _local(path)
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


def load(
    path: str | Path,
    *,
    trust_code: bool = False,
    map_location: str | torch.device | None = None,
) -> nn.Module:
    """Build a saved model again: a ``.safetensors`` save, a save folder, a folder save on
    the Hugging Face Hub (``"hf-hub:ORG/NAME"``, or ``"hf-hub:ORG/NAME@REVISION"``), or a
    fine-tuning checkpoint (``last.pt`` / ``best.pt``). Its outputs equal the saved model's
    bit for bit, in the dtype it was saved in.

    Nothing the file names is imported or run unless ``trust_code``: timm and torchvision
    registry names, retrofit's attention types and those registered in this process load
    as they are; a model file, a ``module:Class`` attention or an unimported leaf-module
    class is refused with :class:`~retrofit.errors.UntrustedCodeError` before anything is
    imported. With trust, a model file is found relative to the save (not the current
    folder) and must be the file the model was saved with (same sha256). A Hub save is
    fetched through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, your login) into the
    cache's snapshot folder and then read as a local folder under the same rules: a model
    file it names comes from the same repository and commit.

    Not to be confused with ``retrofit.create_model("hf-hub:ORG/NAME")``, which builds a
    *base model* from timm's Hub weights; ``load`` reads a *retrofit save* (``recipe.json`` +
    ``model.safetensors``) such as :func:`retrofit.push_to_hub` writes.

    Args:
        path: the save or checkpoint; a string starting with ``hf-hub:`` names a Hub save.
        trust_code: allow the code the file names (as Hugging Face's ``trust_remote_code``).
        map_location: device to put the model on (``"cpu"``, ``"cuda:0"``, ...); default the CPU.

    Raises:
        UntrustedCodeError: the file names code and ``trust_code`` is False.
        ModelLoadError: the file is missing, corrupted, names a model file that changed, or
            its weights do not fit the model its recipe builds; a Hub save cannot be fetched
            (no such repository or revision, not a retrofit save, offline and not cached).

    Example:
        >>> gm = retrofit.load("runs/se/best.pt")
        >>> gm = retrofit.load("hf-hub:my-org/resnet50-se")
    """
    saved = read_save(path)
    now = package_versions()
    changed = [f"{k} {saved.versions[k]} -> {now[k]}" for k in now if k in saved.versions and saved.versions[k] != now[k]]
    if changed:
        warnings.warn(f"{path} was saved with other package versions ({', '.join(changed)})", stacklevel=2)
    saved.recipe.check_trust(trust_code, str(path))
    recipe = saved.recipe.resolved(saved.folder)
    model = recipe.build()
    if saved.checkpoint is not None:
        state = {k: v.cpu() for k, v in saved.checkpoint["model"].items()}
    else:
        try:
            state = {}
            for file in _weight_files(saved.path) if saved.kind == "folder" else [saved.path]:
                state.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"cannot read saved model {str(path)!r} (corrupted?): {first_line(e)}") from e
    assign_weights(model, state, f"weights in {str(path)!r}", "the file does not match its own recipe (was it "
                   "edited, or written by another program?)", keep_dtype=True)
    return model.to(torch.device(map_location)) if map_location is not None else model
