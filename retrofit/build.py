"""Models built from a recipe: the base model, the rules applied to it, and the files that
hold both. The one place that turns a :class:`~retrofit.recipe.Recipe` (plain data) back
into a model, so :mod:`retrofit.recipe` and :mod:`retrofit.saving` stay records and files.

:func:`save` checks that the recipe builds the model again before it writes anything;
:func:`load` reads a save (local, or ``"hf-hub:ORG/NAME"`` fetched through
:mod:`retrofit.hub`), refuses what would run code unless trusted, builds the model and
loads the weights.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .api import retrofit_with
from .errors import ModelLoadError, OptionError, RetrofitError, SaveError, first_line
from .hub import download, is_hub_save
from .models import check_device, create_model, model_files_run_once, model_from_file, run_model_file
from .readfile import Limits, current_limits, limits_applied
from .recipe import Recipe, attach_recipe, get_recipe
from .rulefile import parse_rules
from .saving import check_save_path, package_versions, read_save, read_weights, tensor_shapes, write_save
from .specs import is_file_spec, split_file_spec
from .text import shorten
from .weights import assign_weights

__all__ = ["build_model", "apply_recipe", "save", "load", "local_save"]


def build_base(recipe: Recipe, *, pretrained: bool = False, trust_code: bool = False) -> nn.Module:
    """The model a recipe's rules are applied to (fresh weights unless ``pretrained``): the
    base model it names, or, for a stacked recipe, its base recipe built.

    Call :meth:`Recipe.check_trust` and :meth:`Recipe.resolved` first for a recipe read
    from a file, and pass the trust the user gave: the builders check what they build
    against it again (an Ultralytics yaml's layers, a checkpoint).

    Raises:
        ModelLoadError: the recipe names no model, or the model cannot be built.
    """
    if recipe.base is not None:
        return build_model(recipe.base, pretrained=pretrained, trust_code=trust_code)
    if recipe.model is None:
        raise ModelLoadError(
            "the recipe does not say which model to build (retrofit() got a model object it could not "
            "name); save with model_spec='resnet50' (timm), 'torchvision:NAME' or 'path/to/file.py:factory', "
            "or build the model with retrofit.create_model(...)"
        )
    spec = recipe.model.removeprefix("timm:")
    if is_file_spec(spec) and recipe.model_sha256 is not None and not pretrained:
        # A recipe read from a save: the file runs only if its bytes have the recorded hash.
        model = model_from_file(spec, recipe.model_kwargs, sha256=recipe.model_sha256)
        attach_recipe(model, Recipe().with_model(spec, recipe.model_kwargs))
        return model
    return create_model(recipe.model, pretrained=pretrained, trust_code=trust_code, **recipe.model_kwargs)


def build_model(recipe: Recipe, *, pretrained: bool = False, verify: bool = False,
                trust_code: bool = False) -> nn.Module:
    """The base model, then the recipe's rules and options applied (fresh weights, or the
    base model's pretrained ones); :func:`load` loads saved weights into it."""
    return apply_recipe(recipe, build_base(recipe, pretrained=pretrained, trust_code=trust_code), verify=verify)


def apply_recipe(recipe: Recipe, model: nn.Module, *, verify: bool = False) -> nn.Module:
    """:func:`retrofit.retrofit` of ``model`` with the recipe's rules and options (the model
    itself for a recipe without rules)."""
    if recipe.rules is None:
        return model
    options = recipe.options.replace(leaf_modules=tuple(_resolve_leaf(s) for s in recipe.options.leaf_modules))
    with warnings.catch_warnings():
        # What the rewrite had to say ("does not trace as a whole") was said when the
        # model was made; rebuilding it from the record says it again to no purpose.
        warnings.simplefilter("ignore")
        # check_identity follows verify: a rebuilt model gets its weights right after.
        result = retrofit_with(model, parse_rules(recipe.rules, recipe.rules_name), options, verify=verify,
                               check_identity=verify)
    attach_recipe(result, recipe)
    return result


def _resolve_leaf(spec: Any) -> type[nn.Module] | str:
    """A leaf-module name as retrofit() takes it: ``module:QualName`` imported, else as is."""
    if not isinstance(spec, str) or ":" not in spec:
        return spec
    module_name, _, qualname = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"leaf module {spec!r} cannot be imported: {e}") from e
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelLoadError(f"leaf module {spec!r} is a {type(obj).__name__}, not an nn.Module class")
    return obj


def local_save(path: str | Path) -> Path:
    """Where a save lies on this machine: ``path`` itself, or for ``"hf-hub:ORG/NAME"`` (a
    string; a ``Path`` is always local) the snapshot folder :func:`retrofit.hub.download`
    fetched it to."""
    return download(path) if isinstance(path, str) and is_hub_save(path) else Path(path)


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
        kwargs = ", ".join(f"{k!r}: {_short_repr(v)}" for k, v in recipe.innermost().model_kwargs.items())
        return OptionError(
            f"not saved: the recipe (model {recipe.innermost().model!r}, arguments {{{kwargs}}}) {what}; pass "
            "model_spec='resnet50' (timm), 'torchvision:NAME' or 'path/to/file.py:factory' and model_kwargs "
            "(e.g. {'num_classes': 10, 'in_chans': 1}) to save(), or build the model with retrofit.create_model()"
        )

    def differs(got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], extra_ok: bool) -> str | None:
        missing = [k for k in got if k not in want]
        extra = [] if extra_ok else [k for k in want if k not in got]
        shape = [f"{k} {list(got[k])} instead of {list(want[k])}" for k in got if k in want and got[k] != want[k]]
        if not (missing or extra or shape):
            return None
        parts = ([f"has {len(missing)} tensors this one lacks (e.g. {', '.join(missing[:2])})"] if missing else []) + \
                ([f"lacks {len(extra)} of its tensors (e.g. {', '.join(extra[:2])})"] if extra else []) + \
                ([f"has {len(shape)} of another shape (e.g. {'; '.join(shape[:2])})"] if shape else [])
        return ", ".join(parts)

    want = _state_shapes(model)

    def rebuild(device: torch.device | None) -> str | None:
        """How the rebuilt model differs from the one to save, or None."""
        with device or contextlib.nullcontext():
            # The recipe of a model in this process: what it names was built here already
            # (by the user, or by a load that checked its trust).
            base = build_base(recipe, trust_code=True)
        # The base model first: a wrong guess of its arguments shows here, named, rather than
        # as a failure somewhere in the rewrite.
        found = differs(_state_shapes(base), want, extra_ok=True)
        if found is not None:
            return found
        with device or contextlib.nullcontext():
            return differs(_state_shapes(apply_recipe(recipe, base)), want, extra_ok=False)

    try:
        try:
            found = rebuild(torch.device("meta"))
        except Exception:  # a constructor or rewrite that needs real values (`.item()`): for real
            found = rebuild(None)
    except RetrofitError as e:
        raise explain(f"cannot build the model again ({first_line(e)})") from e
    except Exception as e:
        raise explain(f"cannot build the model again ({type(e).__name__}: {first_line(e)})") from e
    if found is not None:
        raise explain(f"builds a model that {found}")


def _short_repr(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


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
    if recipe.innermost().model is None:
        raise OptionError(
            f"cannot tell which model {type(model).__name__} was built from; pass model_spec='resnet50' (timm), "
            "'torchvision:resnet50' or 'path/to/file.py:factory' (and model_kwargs), or build the model with "
            "retrofit.create_model()"
        )
    if any(t.device.type == "meta" for t in model.state_dict().values()):
        raise SaveError(f"cannot save {type(model).__name__}: it is on the meta device and has no weights; "
                        "build it on a real device (or load its weights) first")
    check_save_path(path, force)
    _check_rebuilds(model, recipe)
    return write_save(model, path, recipe, force=force)


_T = TypeVar("_T")


def _building(step: Callable[[], _T], where: str, doing: str = "build the model its recipe describes") -> _T:
    """``step()``, building the model a file's recipe describes (or ``doing`` another step of
    a load): what goes wrong there is the file's doing (a field edited to what the builders
    do not take), a ModelLoadError."""
    try:
        return step()
    except RetrofitError:
        raise
    except MemoryError as e:
        raise ModelLoadError(f"{where!r}: the model its recipe describes does not fit in memory; the file does not "
                             "match its own recipe (was it edited, or written by another program?)") from e
    except RecursionError as e:
        raise ModelLoadError(f"{where!r}: building the model its recipe describes recursed too deeply; the recipe "
                             "is not one retrofit wrote") from e
    except Exception as e:
        raise ModelLoadError(f"{where!r}: cannot {doing} ({type(e).__name__}: "
                             f"{shorten(first_line(e), 300)}); was the file edited, or written by another program or "
                             "version?") from e


def _on_meta(recipe: Recipe) -> Recipe:
    """The recipe with every ``device`` model argument set to ``meta`` (a builder given a
    device builds there whatever the default device)."""
    base = None if recipe.base is None else _on_meta(recipe.base)
    kwargs = {**recipe.model_kwargs, "device": "meta"} if "device" in recipe.model_kwargs else recipe.model_kwargs
    return replace(recipe, base=base, model_kwargs=kwargs)


def _check_against_file(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], where: str, *, whole: bool) -> None:
    """Compare the tensors of ``model`` (built on the meta device) with the names and shapes
    of the weights file; ``whole``: the model is complete (else a base model, whose tensors
    that the file holds must have the file's shapes).

    Raises:
        ModelLoadError: naming the first tensor that differs, or the buffers the file does
            not hold are over ``Limits.unsaved_elements``.
    """
    hint = ("the file does not match its own recipe (was it edited, or written by another program?); nothing was "
            "built")
    own = model.state_dict(keep_vars=True)
    in_file = {id(t) for n, t in own.items() if n in shapes}
    for name, t in own.items():
        want = shapes.get(name)
        if want is None:
            if whole and id(t) not in in_file:  # a tied tensor is saved once, under one of its names
                raise ModelLoadError(f"{where!r}: its recipe builds a model with tensor {name!r} {list(t.shape)}, "
                                     f"which its weights lack; {hint}")
        elif tuple(t.shape) != tuple(want):
            raise ModelLoadError(f"{where!r}: its recipe builds tensor {name!r} of shape {list(t.shape)}, its weights "
                                 f"hold {list(want)}; {hint}")
    if not whole:
        return
    extra = next((n for n in shapes if n not in own), None)
    if extra is not None:
        raise ModelLoadError(f"{where!r}: its weights hold tensor {extra!r}, which the model its recipe builds lacks; "
                             f"{hint}")
    saved = {id(t) for t in own.values()}
    unsaved: dict[int, int] = {id(t): t.numel() for t in [*model.parameters(), *model.buffers()] if id(t) not in saved}
    cap = current_limits().unsaved_elements
    if sum(unsaved.values()) > cap:
        raise ModelLoadError(f"{where!r}: its recipe builds a model with {sum(unsaved.values())} elements in tensors "
                             f"its weights do not hold, over the limit of {cap} (Limits.unsaved_elements); {hint}")


def _checked_on_meta(recipe: Recipe, shapes: Mapping[str, tuple[int, ...]], where: str, trust_code: bool) -> bool:
    """Build ``recipe`` on the meta device (no memory, no init) and compare it with the
    weights file; False where the model cannot be built on the meta device (a constructor
    that needs real values, as Ultralytics' does): it is then compared once built.

    Raises:
        ModelLoadError: the recipe builds another model than the weights file holds.
    """
    meta = _on_meta(recipe)
    try:
        with torch.device("meta"):
            base = build_base(meta, trust_code=trust_code)
    except Exception:  # noqa: BLE001 - needs real values; a real error shows again in the real build
        return False
    _check_against_file(base, shapes, where, whole=False)  # a base model's arguments, named, before the rewrite
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = apply_recipe(meta, base)
    except Exception:  # noqa: BLE001 - as above
        return False
    _check_against_file(model, shapes, where, whole=True)
    return True


def load(
    path: str | Path,
    *,
    trust_code: bool = False,
    map_location: str | torch.device | None = None,
    limits: Limits | None = None,
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
    folder), must lie inside it (unless ``Limits.model_file_outside_save``; a save carries
    its model file) and must be the file the model was saved with (same sha256). A Hub save is
    fetched through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, your login) into the
    cache's snapshot folder and then read as a local folder under the same rules: a model
    file it names comes from the same repository and commit.

    Files from others are read as :mod:`retrofit.readfile` reads them: regular files only
    (a FIFO or a device is refused at once), under size caps, JSON under a nesting cap. The
    model the recipe describes is built on the meta device first and compared, tensor by
    tensor, with the names and shapes in the weights file's header (themselves checked
    against the file's size), and built for real only when they match: a recipe edited to
    ask for a huge model is refused before anything is allocated. A model that cannot be
    built on the meta device (Ultralytics) is compared once built.

    Not to be confused with ``retrofit.create_model("hf-hub:ORG/NAME")``, which builds a
    *base model* from timm's Hub weights; ``load`` reads a *retrofit save* (``recipe.json`` +
    ``model.safetensors``) such as :func:`retrofit.push_to_hub` writes.

    Args:
        path: the save or checkpoint; a string starting with ``hf-hub:`` names a Hub save.
        trust_code: allow the code the file names (as Hugging Face's ``trust_remote_code``).
        map_location: device to put the model on (``"cpu"``, ``"cuda:0"``, ...); default the CPU.
        limits: what the file may make retrofit read and build
            (:class:`retrofit.readfile.Limits`); default the limits in force.

    Raises:
        UntrustedCodeError: the file names code and ``trust_code`` is False.
        ModelLoadError: the file is missing, unreadable, not a regular file, over a limit,
            corrupted, names a model file that changed (or records no hash for it), or its
            weights do not fit the model its recipe builds; a Hub save cannot be fetched
            (no such repository or revision, not a retrofit save, offline and not cached).
        OptionError: ``map_location`` is not a device of this machine.

    Example:
        >>> gm = retrofit.load("runs/se/best.pt")
        >>> gm = retrofit.load("hf-hub:my-org/resnet50-se")
    """
    device = None if map_location is None else check_device(map_location, "map_location")
    where = str(path)
    with limits_applied(limits):
        saved = read_save(local_save(path), where)
        now = package_versions()
        changed = [f"{k} {saved.versions[k]} -> {now[k]}" for k in now
                   if k in saved.versions and saved.versions[k] != now[k]]
        if changed:
            warnings.warn(f"{path} was saved with other package versions ({', '.join(changed)})", stacklevel=2)
        _building(lambda: saved.recipe.check_trust(trust_code, where), where, "tell what its recipe would run")
        recipe = saved.recipe.resolved(saved.folder, where)
        shapes = tensor_shapes(saved)
        with model_files_run_once():  # a model file runs once, for both builds
            for level in recipe.chain():  # first: its hash checked, its import's errors its own
                if level.model is not None and is_file_spec(level.model) and level.model_sha256 is not None:
                    run_model_file(split_file_spec(level.model.removeprefix("timm:"))[0], level.model_sha256)
            _checked_on_meta(recipe, shapes, where, trust_code)
            model = _building(lambda: build_model(recipe, trust_code=trust_code), where)
        weights = read_weights(saved)
    _building(lambda: assign_weights(model, weights, f"weights in {where!r}", "the file does not match its own "
                                     "recipe (was it edited, or written by another program?)", keep_dtype=True), where,
              "load its weights")
    return model.to(device) if device is not None else model
