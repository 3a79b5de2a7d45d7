"""How a model was built: one record, from the base model's name to every option of
:func:`retrofit.retrofit`.

:func:`retrofit.create_model` records the base model's name and arguments on the model it
builds; :func:`retrofit.retrofit` attaches the full :class:`Recipe` to its result;
:func:`retrofit.save` writes it, fine-tuning checkpoints carry it, and
:func:`retrofit.load` builds the model again from it. A recipe is plain data (strings,
numbers, lists, tables), so that the files that hold one hold no pickled code.

Files come from other people, so building from a recipe trusts nothing by default, as
Hugging Face's ``trust_remote_code``. Without ``trust_code`` a recipe may name timm and
torchvision models by their registry names, retrofit's attention types and the types
registered in the running process, and leaf-module classes of modules already imported.
Anything else it names (a model file and its factory, a ``module:Class`` attention or leaf
module whose module is not imported, a model argument that loads a file) is refused
before anything is imported, by an :class:`~retrofit.errors.UntrustedCodeError` that says
what the recipe asks to run and how to allow it.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PureWindowsPath
from typing import Any

from torch import nn

from .attention import is_registered
from .errors import ModelLoadError, SaveError, UntrustedCodeError
from .frameworks import framework_of, framework_of_spec
from .meta import RECIPE_KEY, retrofit_meta
from .options import RetrofitOptions, plain_data
from .readfile import current_limits
from .specs import is_file_spec, split_file_spec
from .text import excerpt

__all__ = ["Recipe", "get_recipe", "attach_recipe", "recipe_of_result", "TRUST_HINT"]

TRUST_HINT = ("load it only if you trust where it came from: trust_code=True in Python, --trust-code on the "
              "command line")
# Model constructor arguments that make timm or torchvision read a file or download one
# (timm's `checkpoint_path` is read with pickle): weights come from the save, never from these.
_LOADING_KWARGS = ("pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                   "weights", "weights_backbone")


# The recipe's own fields and the JSON types they may have (the options declare theirs).
_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str, type(None)), "model_kwargs": (dict,), "model_sha256": (str, type(None)),
    "base": (dict, type(None)), "rules": (dict, type(None)), "rules_name": (str,),
}


def _real(path: Path) -> Path:
    """``path`` with its folder's symlinks resolved but its own name kept: a model file in
    the Hugging Face cache is a symlink to a blob named by its hash, and the file must keep
    its ``.py`` name to be imported (and to be recognised as a model file at all)."""
    return path.parent.resolve() / path.name


@dataclass(frozen=True)
class Recipe:
    """How to build a model again: its base model, then the retrofit options.

    Plain data throughout (the tables are dicts, so that a model carrying a recipe can be
    deep-copied and pickled); treat it as read-only.

    Example:
        >>> gm = retrofit.retrofit(retrofit.create_model("resnet18", num_classes=10), "se")
        >>> get_recipe(gm).model, get_recipe(gm).model_kwargs
        ('resnet18', {'num_classes': 10})
    """

    # timm name, "hf-hub:ORG/NAME", "torchvision:NAME", "path/to/file.py:factory", "ultralytics:...",
    # "transformers:...", "smp:..."; None: unknown
    model: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # constructor or factory arguments
    model_sha256: str | None = None  # file models: the file's hash when the recipe was written
    base: Recipe | None = None  # the model retrofit() got was itself built by this recipe (stacked)
    rules: Mapping[str, Any] | None = None  # the rule document as plain data; None: no retrofit, the base alone
    rules_name: str = "<rules>"  # where the rules came from ("built-in 'se'", a file path)
    options: RetrofitOptions = field(default_factory=RetrofitOptions)  # the other retrofit() options

    # ------------------------------------------------------------------ plain data

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data; :meth:`from_dict` reads it back. The options are fields of
        their own (``gate``, ``attn_args``, ...), as in every recipe written so far."""
        d = {f.name: plain_data(getattr(self, f.name)) for f in fields(self) if f.name not in ("base", "options")}
        d["base"] = None if self.base is None else self.base.to_dict()
        return {**d, **self.options.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, where: str = "recipe") -> Recipe:
        """Read a recipe written by :meth:`to_dict`, checking every field's type.

        Raises:
            ModelLoadError: not a recipe: an unknown field, or a field of the wrong type.
        """
        # The levels, outermost first, followed without recursion: a chain longer than
        # Limits.base_chain is refused before any level is read.
        levels: list[Any] = [d]
        while isinstance(levels[-1], Mapping) and levels[-1].get("base") is not None:
            if len(levels) >= current_limits().base_chain:
                raise ModelLoadError(f"{where}: the recipe stacks more than {current_limits().base_chain} retrofits "
                                     "(Limits.base_chain, field 'base'); it is not a recipe retrofit wrote")
            levels.append(levels[-1]["base"])
        recipe: Recipe | None = None
        for level in reversed(levels):
            recipe = cls._level_from_dict(level, recipe, where)
        assert recipe is not None
        return recipe

    @classmethod
    def _level_from_dict(cls, d: Any, base: Recipe | None, where: str) -> Recipe:
        """One level of a recipe (its ``base`` already read)."""
        if not isinstance(d, Mapping):
            raise ModelLoadError(f"{where}: the recipe is a {type(d).__name__}, not a table")
        known = set(_TYPES) | set(RetrofitOptions.names())
        unknown = sorted(set(d) - known, key=str)
        if unknown:
            raise ModelLoadError(f"{where}: unknown recipe field(s) {', '.join(excerpt(u, 40) for u in unknown[:5])} "
                                 f"(valid: {', '.join(sorted(known))}); was it written by a newer retrofit?")
        values: dict[str, Any] = {}
        for name, value in d.items():
            if name in _TYPES and not isinstance(value, _TYPES[name]):
                raise ModelLoadError(f"{where}: recipe field {name!r} is a {type(value).__name__} "
                                     f"({excerpt(value, 60)})")
            values[name] = value
        if not all(isinstance(k, str) for k in values.get("model_kwargs", {})):
            raise ModelLoadError(f"{where}: recipe field 'model_kwargs' must be a table with string keys")
        sha = values.get("model_sha256")
        if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ModelLoadError(f"{where}: recipe field 'model_sha256' is {excerpt(sha, 80)}, not a sha256 (64 hex "
                                 "digits)")
        values.pop("base", None)
        options = RetrofitOptions.from_dict({k: values.pop(k) for k in RetrofitOptions.names() if k in values}, where)
        return cls(**values, base=base, options=options)

    def chain(self) -> list[Recipe]:
        """The recipe's levels, innermost (the base model's) first: a retrofit of a retrofit
        has two, and each names the rules applied at that step."""
        out: list[Recipe] = []
        r: Recipe | None = self
        while r is not None:
            out.append(r)
            r = r.base
        return out[::-1]

    def innermost(self) -> Recipe:
        """The level that names the base model (this recipe when it is not stacked)."""
        return self.chain()[0]

    # ------------------------------------------------------------------ trust

    def foreign_code(self) -> list[str]:
        """What building this recipe would import or run beyond timm, torchvision and what
        is already loaded in this process (empty: nothing)."""
        found: list[str] = []
        for r in self.chain():
            if r.model is not None and is_file_spec(r.model):
                file, factory = split_file_spec(r.model)
                found.append(f"the model file {file!r} (its function {factory!r} builds the model)")
            elif r.model is not None and (framework := framework_of_spec(r.model)) is not None:
                found += framework[0].foreign_code(framework[1], r.model_kwargs)
            if r.model is not None and r.model.removeprefix("timm:").startswith("local-dir:"):
                found.append(f"the timm model folder {r.model!r}, whose config.json timm would read from this machine")
            for key in _LOADING_KWARGS:
                if key in r.model_kwargs:
                    found.append(f"the model argument {key}={r.model_kwargs[key]!r}, which loads a file")
            tables = (r.rules or {}).get("rule", [])
            for i, table in enumerate(tables if isinstance(tables, list) else [], 1):
                attn = table.get("attn") if isinstance(table, Mapping) else None
                if isinstance(attn, str) and ":" in attn and not is_registered(attn):
                    found.append(f"the attention class {attn!r} ({r.rules_name}, rule {i})")
            for leaf in r.options.leaf_modules:
                # a class (not a name) is loaded already; recorded recipes hold names only
                if isinstance(leaf, str) and ":" in leaf and leaf.partition(":")[0] not in sys.modules:
                    found.append(f"the leaf-module class {leaf!r}")
        return found

    def check_trust(self, trust_code: bool, where: str) -> None:
        """Refuse, before anything is imported, a recipe that names code to run.

        Raises:
            UntrustedCodeError: the recipe names code and ``trust_code`` is False.
        """
        found = self.foreign_code()
        if found and not trust_code:
            raise UntrustedCodeError(f"{where} asks to run code: {'; '.join(found)}. Nothing was imported; "
                                     f"{TRUST_HINT}")

    # ------------------------------------------------------------------ files

    def _file(self, base_dir: Path | None) -> tuple[Path, str]:
        """The model file (resolved against ``base_dir``) and the factory name."""
        file, factory = split_file_spec(self.model or "")
        path = Path(file)
        if not path.is_absolute():
            path = (base_dir if base_dir is not None else Path.cwd()) / path
        return path, factory

    def model_files(self) -> list[str]:
        """The model files this recipe names (``file`` of ``file.py:factory``), as written:
        relative to the save in a recipe read from one."""
        return [split_file_spec(r.model)[0] for r in self.chain() if r.model is not None and is_file_spec(r.model)]

    def located(self, folder: Path) -> tuple[Recipe, dict[str, bytes]]:
        """This recipe as a file in ``folder`` records it, and the model files to write there.

        A model file inside ``folder`` is named by its path relative to it. One elsewhere
        travels with the save, as Hugging Face's ``save_pretrained`` copies a model's own
        code: the recipe names it by its file name and it is returned (``{name: bytes}``) to
        be written into ``folder``, since a load runs only model files inside the save. Each
        records the sha256 of its bytes, so that loading runs the file that was saved.

        Raises:
            SaveError: the model file is gone, or two model files of a stacked recipe
                share a name.
        """
        base, carried = (None, {}) if self.base is None else self.base.located(folder)
        if self.model is None or not is_file_spec(self.model):
            return replace(self, base=base), carried
        path, factory = self._file(None)
        if not path.is_file():
            raise SaveError(f"model file {str(path)!r} not found; a save records the file's hash, so the file "
                            "must exist when the model is saved")
        rel = Path(os.path.relpath(_real(path), Path(folder).resolve()))
        source = path.read_bytes()
        if ".." in rel.parts:
            rel = Path(path.name)
            if carried.get(path.name, source) != source:
                raise SaveError(f"the recipe names two model files called {path.name!r}; a save carries both "
                                "beside it: rename one")
            carried[path.name] = source
        sha = hashlib.sha256(source).hexdigest()
        return replace(self, base=base, model=f"{rel.as_posix()}:{factory}", model_sha256=sha), carried

    def resolved(self, base_dir: Path | None, where: str = "the recipe") -> Recipe:
        """The inverse of :meth:`located`: a model file's path made absolute (relative to
        ``base_dir``, the save's folder); a library's config or yaml the recipe names by path
        read from inside the save as data (:meth:`Framework.resolve
        <retrofit.frameworks.Framework.resolve>`). A recipe read from a file must record the model
        file's sha256 and name it by a relative path; the hash is checked against the
        bytes that run, when they are read to be run (:func:`retrofit.build.build_base`).
        The file must lie in ``base_dir`` (its folders' symbolic links resolved), unless
        ``Limits.model_file_outside_save``.

        Raises:
            ModelLoadError: the file is missing, named by an absolute path, outside the save
                (unless allowed), or its hash is not recorded.
        """
        base = None if self.base is None else self.base.resolved(base_dir, where)
        framework = None if self.model is None else framework_of_spec(self.model)
        if framework is not None:  # a library's config or yaml the recipe names: read as data from the save
            name, kwargs = framework[0].resolve(framework[1], self.model_kwargs, base_dir or Path.cwd(), where)
            return replace(self, base=base, model=f"{framework[0].prefix}:{name}", model_kwargs=kwargs)
        if self.model is None or not is_file_spec(self.model):
            return replace(self, base=base)
        file, factory = split_file_spec(self.model)
        if Path(file).is_absolute() or PureWindowsPath(file).is_absolute():
            raise ModelLoadError(f"{where}: the recipe names the model file by an absolute path ({file!r}); a save "
                                 "names it relative to itself. Not running it")
        path, factory = self._file(base_dir)
        inside = not os.path.relpath(_real(path), (base_dir or Path.cwd()).resolve()).startswith("..")
        if not inside and not current_limits().model_file_outside_save:
            raise ModelLoadError(f"{where}: the recipe names the model file {file!r}, outside the save's folder; a "
                                 "save carries its model file. Not running it (a file of your own elsewhere: "
                                 "Limits(model_file_outside_save=True), its sha256 still checked)")
        if not path.is_file():
            raise ModelLoadError(f"model file {str(path)!r} not found (the recipe names {self.model!r}, relative "
                                 "to the save); put the model's file there")
        if self.model_sha256 is None:
            raise ModelLoadError(
                f"{where}: the recipe names the model file {file!r} without its sha256 (field 'model_sha256'); not "
                "running a file that cannot be checked. retrofit.save records it: build the model and save it again"
            )
        return replace(self, base=base, model=f"{_real(path)}:{factory}")

    # ------------------------------------------------------------------ the base model

    def with_model(self, model: str | None, model_kwargs: Mapping[str, Any] | None) -> Recipe:
        """The same recipe with another base model (the innermost one, for a stacked recipe)."""
        if self.base is not None:
            return replace(self, base=self.base.with_model(model, model_kwargs))
        kwargs = self.model_kwargs if model_kwargs is None else plain_data(model_kwargs)
        if model is not None and is_file_spec(model):
            file, factory = split_file_spec(model)
            model = f"{_real(Path(file))}:{factory}"
        return replace(self, model=self.model if model is None else model, model_kwargs=kwargs, model_sha256=None)


def get_recipe(model: nn.Module) -> Recipe | None:
    """The recipe a model carries: from :func:`retrofit.create_model`, :func:`retrofit.retrofit`
    or :func:`retrofit.load`; None for any other model."""
    recipe = retrofit_meta(model).get(RECIPE_KEY)
    return recipe if isinstance(recipe, Recipe) else None


def attach_recipe(model: nn.Module, recipe: Recipe) -> None:
    """Record how ``model`` was built (what :func:`get_recipe` returns)."""
    retrofit_meta(model, create=True)[RECIPE_KEY] = recipe


def _named_by_timm(model: nn.Module) -> Recipe:
    """A timm model names its own architecture; its classifier size is an attribute. Other
    constructor arguments are not recorded anywhere (``retrofit.save`` checks the guess)."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        return Recipe()
    n = getattr(model, "num_classes", None)
    return Recipe(model=arch, model_kwargs={"num_classes": n} if isinstance(n, int) else {})


def _named_by_framework(model: nn.Module) -> Recipe:
    """A model of Ultralytics, transformers or smp names itself: its yaml or config as data."""
    framework = framework_of(model)
    described = None if framework is None else framework.describe(model)
    return Recipe() if described is None else Recipe(model=described[0], model_kwargs=described[1])


def recipe_of_result(model: nn.Module, rules_doc: Mapping[str, Any], rules_name: str,
                     options: RetrofitOptions) -> Recipe:
    """The recipe of ``retrofit(model, ...)``: how ``model`` was built (what it carries, or
    what its library or timm says), then these rules and options. A model that is itself a
    retrofit result becomes the ``base`` of the new recipe."""
    given = get_recipe(model)
    if given is None:
        given = _named_by_framework(model)
        given = given if given.model is not None else _named_by_timm(model)
    opts = {"rules": plain_data(rules_doc), "rules_name": rules_name, "options": options.recorded()}
    if given.rules is not None:
        return Recipe(base=given, **opts)
    return replace(given, **opts)
