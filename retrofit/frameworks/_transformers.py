"""Hugging Face transformers: image models built from a config, as plain data.

A recipe names the model class (``transformers:ResNetForImageClassification``) and holds
the config as a dict (``{"config": {...}}``); building it again calls the class on the
config, so nothing is downloaded and no file's code runs. Only classes the transformers
package itself defines are built: a config that names remote code (``auto_map``) is code.

A retrofitted transformers model keeps its class (its forward does not trace as a whole
in transformers 5, so the result is the model with rewritten blocks), and its config
carries the recipe under ``retrofit``: ``save_pretrained`` writes it into ``config.json``,
and :func:`retrofit.load` on that folder builds the model with its attention and loads the
weights (``from_pretrained`` of the plain class would drop the attention).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

from torch import nn

from ..errors import ModelLoadError, first_line
from ..meta import original_class
from ..readfile import file_in_folder, json_depth, read_json
from ..text import shorten
from ._base import Framework, register_framework

__all__: list[str] = []

CONFIG_KEY = "retrofit"  # the config attribute (and config.json key) holding the recipe
_REMOTE = ("auto_map", "trust_remote_code")


class _ModelClass(Protocol):
    """What :meth:`Transformers.build` uses of a ``PreTrainedModel`` subclass (transformers is
    optional, so its class cannot be named in a signature here)."""

    config_class: Any  # the PretrainedConfig subclass its constructor takes

    def __call__(self, config: Any) -> nn.Module: ...

    def from_pretrained(self, repo: str, **kwargs: Any) -> nn.Module: ...


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' info and warning logs (weights it initialised, ...) off while building."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _read_config(path: Path) -> dict[str, Any]:
    """A ``config.json`` read as retrofit reads every file from others: a regular file, under
    ``Limits.json_bytes``, nesting capped (:func:`retrofit.readfile.read_json`)."""
    config = read_json(path, f"the transformers config {str(path)!r}")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{str(path)!r} is not a JSON object")
    return config


def _remote_keys(config: Any) -> list[str]:
    """The keys naming remote code (``auto_map``, ``trust_remote_code``) anywhere in a config,
    sub-configs (a backbone's, a text model's) included, and a timm backbone named as a
    folder of this machine (``local-dir:``, whose config.json timm reads); walked without
    recursion."""
    found: list[str] = []
    todo = [config]
    while todo:
        value = todo.pop()
        if isinstance(value, Mapping):
            found += [k for k in _REMOTE if value.get(k)]
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
        elif isinstance(value, str) and value.startswith("local-dir:"):
            found.append(f"a timm model folder {value!r}")
    return sorted(set(found))


def _architecture(config: Mapping[str, Any], where: str) -> str:
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ModelLoadError(f"{where} names no model class (\"architectures\"); give the class: "
                             "transformers:ResNetForImageClassification")
    return archs[0]


def _config_dict(config: Any) -> dict[str, Any]:
    d = json.loads(config.to_json_string(use_diff=False))
    d.pop(CONFIG_KEY, None)
    return d


@register_framework
class Transformers(Framework):
    prefix = "transformers"
    package = "transformers"
    distribution = "transformers"
    num_classes_arg = "num_labels"
    traces_in_parts = True
    config_file, config_key = "config.json", CONFIG_KEY  # save_pretrained writes the recipe there

    def describe(self, model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        cls = original_class(model)
        config = getattr(model, "config", None)
        if config is None or not cls.__module__.startswith("transformers.") or any(
                getattr(config, k, None) for k in _REMOTE):
            return None
        return f"transformers:{cls.__name__}", {"config": _config_dict(config)}

    def _class(self, name: str) -> _ModelClass:
        transformers = self.require()
        cls = getattr(transformers, name, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
                and cls.__module__.startswith("transformers.")):
            import difflib

            names = [n for n in dir(transformers) if n.endswith(("ForImageClassification", "Model"))]
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ModelLoadError(f"transformers has no model class {name!r}{hint} (give a class such as "
                                 "transformers:ResNetForImageClassification, or a folder holding a config.json)")
        return cast(_ModelClass, cls)  # a PreTrainedModel subclass: checked above

    def foreign_code(self, name: str, kwargs: Mapping[str, Any]) -> list[str]:
        config = kwargs.get("config")
        if isinstance(config, Mapping) and json_depth(config, 256) <= 256:
            named = _remote_keys(config)
            if named:
                return [f"the remote code its transformers config names ({', '.join(named)})"]
        return []

    def resolve(self, name: str, kwargs: Mapping[str, Any], folder: Path, where: str) -> tuple[str, dict[str, Any]]:
        # A save carries its config (retrofit.save's recipe, save_pretrained's config.json); a
        # recipe naming a folder reads that folder's config.json from inside the save, capped,
        # and nothing is fetched from the Hub or read from elsewhere on this machine.
        if "config" in kwargs:
            return name, dict(kwargs)
        file = file_in_folder(folder, f"{name}/config.json", "the transformers config", where)
        if not file.is_file():
            raise ModelLoadError(f"{where}: the recipe names transformers:{name} without its config, and the save "
                                 f"holds no {name}/config.json; a save carries the config of the model it holds "
                                 "(retrofit.save and save_pretrained write it)")
        config = _read_config(file)
        return _architecture(config, f"{where} ({name}/config.json)"), {**kwargs, "config": config}

    def build(self, name: str, *, pretrained: bool = False, trust_code: bool = False, **kwargs: Any) -> nn.Module:
        config = kwargs.pop("config", None)
        repo = None
        if config is None and (Path(name) / "config.json").is_file():
            config = _read_config(Path(name) / "config.json")
            name = _architecture(config, str(Path(name) / "config.json"))
        elif config is None and "/" in name:
            repo, config = name, self._hub_config(name)
            name = _architecture(config, f"the config of {repo!r}")
        if config is not None and not isinstance(config, Mapping):
            raise ModelLoadError(f"transformers:{name}: config must be a table, not {type(config).__name__}")
        found = self.foreign_code(name, {"config": config})
        if found:
            raise ModelLoadError(f"transformers:{name}: {found[0]}; retrofit builds only the classes transformers "
                                 "itself defines")
        cls = self._class(name)
        if pretrained:
            if repo is None:
                raise ModelLoadError(f"transformers:{name} --pretrained: name the Hub repository to take the weights "
                                     "from, e.g. transformers:microsoft/resnet-50")
            with self._offline_guard(repo, "pretrained weights"), _quiet():
                return cls.from_pretrained(repo, **kwargs)
        try:
            with _quiet():
                return cls(cls.config_class.from_dict(dict(config or {}), **kwargs))
        except ImportError as e:  # a model that needs another package (Dinat: natten)
            raise ModelLoadError(f"cannot build transformers:{name}: {shorten(str(e), 300)}") from e
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            got = f" with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}" if kwargs else ""
            raise ModelLoadError(f"cannot build transformers:{name}{got}: {type(e).__name__}: {first_line(e)}") from e

    @contextlib.contextmanager
    def _offline_guard(self, repo: str, what: str) -> Iterator[None]:
        """Hugging Face offline when its host does not answer (the cache or one clear error)."""
        from ..download import hf_endpoint, hf_offline_requested, unreachable

        why = None if hf_offline_requested() else unreachable(hf_endpoint())
        try:
            with self.offline() if why else contextlib.nullcontext():
                yield
        except OSError as e:
            where = f"no network ({why}) and it is not in the Hugging Face cache" if why else first_line(e)
            raise ModelLoadError(f"cannot download {what} of {repo!r} from the Hugging Face Hub: {where}; connect "
                                 "to the network, or build from a local folder holding config.json") from e

    @contextlib.contextmanager
    def offline(self) -> Iterator[None]:
        """The Hugging Face Hub in offline mode: the cache, or one clear error."""
        from ..download import hf_offline

        with hf_offline():
            yield

    def _hub_config(self, repo: str) -> dict[str, Any]:
        from huggingface_hub import hf_hub_download

        with self._offline_guard(repo, "the config"):
            path = hf_hub_download(repo, "config.json")
        return _read_config(Path(path))

    def stages(self, model: nn.Module) -> list[str] | None:
        return None

    def on_result(self, result: nn.Module, recipe: Any) -> None:
        # A model that kept its class keeps its config: save_pretrained then writes the
        # recipe into config.json, and retrofit.load reads the folder back with attention.
        config = getattr(result, "config", None)
        if config is not None and not isinstance(result, __import__("torch").fx.GraphModule):
            setattr(config, CONFIG_KEY, recipe.to_dict())
