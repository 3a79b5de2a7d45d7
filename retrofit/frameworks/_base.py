"""The adapter contract and the registry of libraries (see :mod:`retrofit.frameworks`).

An adapter is the only place that knows its library: the command line, the saves and the
loads ask it (how to build a model from a name, how to save one in the library's own
format, which config key holds a recipe, whether the model's top level is expected not
to trace, what "offline" means for it) and never test a library's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelLoadError, OptionError
from ..meta import original_class

__all__ = ["Framework", "register_framework", "framework_of", "framework_of_class", "framework_of_spec",
           "registered_frameworks"]


class Framework:
    """What retrofit knows of one library's models. Subclasses fill in the methods."""

    prefix: str = ""  # the spec prefix ("ultralytics"): "ultralytics:yolov8n.yaml"
    package: str = ""  # the import name; a model whose class comes from it belongs here
    distribution: str = ""  # what `pip install` takes
    num_classes_arg: str = "num_classes"  # the constructor argument --num-classes sets
    # The library's models are not expected to trace as a whole (YOLO's forward loops over
    # its layers in Python; transformers' handle their keyword options in Python): that
    # their blocks are rewritten in place is the normal path, said at the INFO level only.
    traces_in_parts: bool = False
    # The file the library's own save_pretrained writes its config to, and the key under
    # which a retrofitted model's config carries its recipe there; None: no such config.
    config_file: str | None = None
    config_key: str | None = None
    # The suffix of the library's own file format that save_native writes (".pt"), and how
    # a message names a file of it ("an Ultralytics checkpoint"); None: no such format.
    native_suffix: str | None = None
    native_format: str = ""
    # The method the library sets as a module's forward once it has folded the module's batch
    # norms into the convolutions before them and deleted them (Ultralytics' fuse():
    # ``m.forward = m.forward_fuse``); a block rewritten in place gets its own, which keeps
    # the attention. None: the library does not do this.
    folded_forward: str | None = None

    def owns_class(self, cls: type) -> bool:
        """Whether the class ``cls`` comes from this library (its module is checked, so the
        library is not imported)."""
        return cls.__module__.split(".", 1)[0] == self.package

    def require(self) -> Any:
        """Import the library, or say how to install it."""
        import importlib

        try:
            return importlib.import_module(self.package)
        except ImportError as e:
            raise ModelLoadError(f"{self.prefix}: models need the package {self.distribution!r}, which is not "
                                 f"installed ({e}); pip install 'torch-retrofit[{self.prefix}]'") from e

    def describe(self, model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        """``(spec, constructor arguments as plain data)`` that build ``model`` again, or None
        when it cannot be named without code."""
        raise NotImplementedError

    def build(self, name: str, *, pretrained: bool = False, trust_code: bool = False, **kwargs: Any) -> nn.Module:
        """Build the model ``name`` (the spec without the prefix) with ``kwargs``.

        Raises:
            ModelLoadError: unknown name, bad arguments, or (``pretrained``) no network.
            UntrustedCodeError: the spec names code (a pickle) and ``trust_code`` is False.
        """
        raise NotImplementedError

    def foreign_code(self, name: str, kwargs: Mapping[str, Any]) -> list[str]:
        """What building ``name`` with ``kwargs`` would import or run beyond the library's
        own classes (empty: nothing)."""
        return []

    def resolve(self, name: str, kwargs: Mapping[str, Any], folder: Path, where: str) -> tuple[str, dict[str, Any]]:
        """The spec name and arguments of a recipe read from a save in ``folder``, where what
        they name on disk (a library's config or yaml) is read here, as data, from inside the
        save (:func:`retrofit.readfile.file_in_folder`), so that the build reads no file.
        Called after the recipe's trust was checked.

        Raises:
            ModelLoadError: the file lies outside the save, is missing or over a limit.
        """
        return name, dict(kwargs)

    def title(self, name: str, kwargs: Mapping[str, Any]) -> str:
        """How a model card names a model of this library built from ``name`` and ``kwargs``."""
        return f"{self.distribution} model `{name}`"

    def stages(self, model: nn.Module) -> list[str] | None:
        """Module paths of the model's stages, for the per-stage diff (None: the default)."""
        return None

    def on_result(self, result: nn.Module, recipe: Any) -> None:
        """Called with every retrofit result of this library's models and its recipe."""

    @contextlib.contextmanager
    def offline(self) -> Iterator[None]:
        """The library set not to reach the network while it builds or saves a model (and
        its console output kept off stdout, where a result goes); by default nothing to set."""
        yield

    def save_native(self, model: nn.Module, path: str | Path, *, force: bool = False) -> Path:
        """Write ``model`` (a retrofit result of this library's model) in the library's own
        format (a file ending in :attr:`native_suffix`), which the library loads by itself.

        Raises:
            OptionError: the library has no such format.
            SaveError: the path exists (without ``force``) or cannot be written.
        """
        raise OptionError(f"{self.distribution} models have no file format of their own here; save with "
                          "retrofit.save (NAME.safetensors or a folder)")

    def native_hint(self, path: Path) -> str:
        """What a user does with a file :meth:`save_native` wrote, in a few words."""
        return f"{self.distribution} loads it"


_FRAMEWORKS: dict[str, Framework] = {}


def register_framework(cls: type[Framework]) -> type[Framework]:
    """Class decorator: register an adapter under its ``prefix``."""
    if cls.prefix in _FRAMEWORKS:
        raise ValueError(f"a framework with prefix {cls.prefix!r} is registered already")
    _FRAMEWORKS[cls.prefix] = cls()
    return cls


def registered_frameworks() -> tuple[Framework, ...]:
    """Every registered adapter, by prefix."""
    return tuple(_FRAMEWORKS[k] for k in sorted(_FRAMEWORKS))


def framework_of(model: nn.Module) -> Framework | None:
    """The adapter of the library ``model`` comes from, or None."""
    return framework_of_class(original_class(model))


def framework_of_class(cls: type) -> Framework | None:
    """The adapter of the library the class ``cls`` comes from, or None."""
    return next((f for f in _FRAMEWORKS.values() if f.owns_class(cls)), None)


def framework_of_spec(spec: str) -> tuple[Framework, str] | None:
    """``(adapter, name)`` for a spec ``"PREFIX:NAME"`` of a registered library, else None."""
    prefix, sep, name = spec.partition(":")
    framework = _FRAMEWORKS.get(prefix) if sep else None
    return None if framework is None else (framework, name)
