"""Building the model a user names: a timm name, ``torchvision:NAME`` or ``file.py:factory``."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import itertools
import re
import socket
import sys
import types
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .download import PROBE_TIMEOUT, hf_endpoint, hf_offline, hf_offline_requested, torch_hub_cached, unreachable
from .errors import ModelLoadError, OptionError, RetrofitError, first_line
from .frameworks import framework_of_spec
from .readfile import current_limits, read_regular
from .recipe import Recipe, attach_recipe, get_recipe
from .specs import is_file_spec, split_file_spec
from .text import excerpt

__all__ = ["create_model", "model_from_file", "run_model_file", "model_files_run_once", "check_device"]

_OFFLINE_HINT = "connect to the network, or drop --pretrained and load weights with --checkpoint"


def _download_error(what: str, e: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot download pretrained weights for {what} ({type(e).__name__}: {first_line(e)}); check the network "
        "(or the local cache with HF_HUB_OFFLINE=1), or drop --pretrained and load weights with --checkpoint"
    )


def _offline_error(what: str, why: str, cache: str, thing: str = "pretrained weights") -> ModelLoadError:
    return ModelLoadError(f"cannot download {thing} for {what}: no network ({why}) and they are not in {cache}; "
                          f"{_OFFLINE_HINT}")


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """A default timeout for sockets opened while the block runs (urllib's ``urlopen`` has none)."""
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(saved)


def _timm(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    hub = name.startswith("hf-hub:")
    if not hub and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ModelLoadError(f"unknown timm model {name!r}{hint}")
    # Weights (and an hf-hub: model's config) come from the Hugging Face Hub; without a
    # network only its cache can serve them, so ask for nothing else (no retries, no waits).
    why = unreachable(hf_endpoint()) if (pretrained or hub) and not hf_offline_requested() else None
    offline = contextlib.ExitStack()
    if why:
        offline.enter_context(hf_offline())
        offline.enter_context(_socket_timeout(PROBE_TIMEOUT))  # the few weights timm takes from plain URLs
    try:
        with offline, contextlib.redirect_stdout(sys.stderr):  # download messages are not results
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as e:  # first: some of Hugging Face's errors are also ValueErrors
        if "checkpoint_path" in kwargs and not why:
            path = kwargs["checkpoint_path"]
            problem = "not found" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {first_line(e)}"
            raise ModelLoadError(f"cannot build timm model {name!r}: its checkpoint_path {excerpt(path, 80)} cannot be "
                                 f"read ({problem}); give the path of a weights file timm reads (.pth, .safetensors), "
                                 "or leave checkpoint_path out") from e
        if why:
            thing = "pretrained weights" if pretrained else "the model's config"
            raise _offline_error(repr(name), why, "the Hugging Face cache", thing) from e
        if not pretrained:
            raise ModelLoadError(f"cannot build timm model {name!r} ({type(e).__name__}: {first_line(e)}); "
                                 "hf-hub: models need the network or the local cache (a retrofit save on the Hub "
                                 f"is not a base model: load it with retrofit.load({name!r}))") from e
        raise _download_error(repr(name), e) from e
    except RetrofitError:
        raise
    except Exception as e:  # a builder that rejects its arguments: TypeError, KeyError (act_layer='nope'), ...
        raise _bad_arguments(f"timm model {name!r}", kwargs, e) from e


def _torchvision(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
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
    if pretrained:
        url = tvm.get_model_weights(name).DEFAULT.url
        why = None if torch_hub_cached(url) else unreachable(url)
        if why:
            raise _offline_error(f"torchvision:{name}", why, "torch.hub's cache")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # torch.hub prints "Downloading: ..." to stdout
            return tvm.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except OSError as e:
        raise _download_error(f"torchvision:{name}", e) from e
    except RetrofitError:
        raise
    except Exception as e:  # a builder that rejects its arguments
        given = {k: v for k, v in kwargs.items() if k != "weights_backbone"}
        raise _bad_arguments(f"torchvision:{name}", given, e) from e


def _show(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _bad_arguments(what: str, kwargs: dict[str, Any], e: Exception) -> ModelLoadError:
    """A builder that rejects its arguments (torchvision's pretrained classifier and another
    ``num_classes``, an unknown keyword, an unknown ``act_layer``, a model too large for memory)."""
    got = f" with {_show(kwargs)}" if kwargs else ""
    if isinstance(e, MemoryError):
        return ModelLoadError(f"cannot build {what}{got}: it does not fit in memory; check the arguments")
    return ModelLoadError(f"cannot build {what}{got}: {type(e).__name__}: {first_line(e)}")


def check_device(value: Any, what: str, error: type[RetrofitError] = OptionError) -> torch.device:
    """``value`` as a device that exists on this machine (``cpu``, ``meta``, a CUDA GPU
    that is there, ...); ``what`` names it in the message, raised as ``error``.

    Raises:
        OptionError: (or ``error``) not a device, or no such device here.
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise error(f"{what} = {excerpt(value, 60)} is not a device ({first_line(e)}); use cpu, cuda or cuda:N") from e
    if device.type in ("cpu", "meta"):
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise error(f"{what} = {value!r}: no CUDA device here (torch.cuda.is_available() is False); use cpu")
        if device.index is not None and device.index >= count:
            raise error(f"{what} = {value!r}: there are {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")
        return device
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise error(f"{what} = {value!r}: no {device.type} device here; use cpu")
    return device


def _check_factory_args(fn: Any, spec: str, kwargs: dict[str, Any]) -> None:
    """Refuse arguments a factory does not take (``--num-classes`` for ``build()``) before calling it."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return  # a builtin or C callable: let the call say
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    extra = [k for k in kwargs if k not in takes]
    if extra:
        flag = " (from --num-classes)" if extra == ["num_classes"] else ""
        raise ModelLoadError(
            f"{spec} takes no argument {extra[0]!r}{flag}; its parameters: {', '.join(takes) or 'none'}. "
            f"Add a {extra[0]} parameter to the factory, or leave the option out"
        )


# Within model_files_run_once(): the module each model file (by path and sha256) ran as.
_RUN_ONCE: ContextVar[dict[tuple[str, str], types.ModuleType] | None] = ContextVar("retrofit_model_files",
                                                                                   default=None)
_MODULE_NUMBER = itertools.count()


@contextlib.contextmanager
def model_files_run_once() -> Iterator[None]:
    """Within the block a model file (the same path and bytes) runs once, and every build
    that names it gets the same module: :func:`retrofit.load` builds a model on the meta
    device first and then for real, and the file's code runs once, as one import would."""
    token = _RUN_ONCE.set({})
    try:
        yield
    finally:
        _RUN_ONCE.reset(token)


def _run_source(path: Path, file: str, source: bytes) -> types.ModuleType:
    """Run a model file's ``source`` (the bytes that were read, and hashed) as a fresh module.

    Compiled here from those bytes: no ``__pycache__`` is read or written, so a ``.pyc``
    shipped beside the file never runs in its place. The module is in ``sys.modules`` under
    a name of its own while it runs (dataclasses and the like look themselves up there) and
    taken out after, as an import that did not happen.
    """
    try:
        code = compile(source, str(path), "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes
        raise ModelLoadError(f"importing {file!r} failed: {type(e).__name__}: {first_line(e)}") from e
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_retrofit_model_file_{next(_MODULE_NUMBER)}_{stem}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except Exception as e:
        raise ModelLoadError(f"importing {file!r} failed: {type(e).__name__}: {first_line(e)}") from e
    finally:
        sys.modules.pop(name, None)
    return module


def run_model_file(file: str, sha256: str | None = None) -> types.ModuleType:
    """The module of a model file: its bytes read once (a regular file under
    ``Limits.model_file_bytes``), checked against ``sha256`` when one is recorded, then run
    from those same bytes (once per :func:`model_files_run_once` block).

    Raises:
        ModelLoadError: the file is missing, unreadable, another file (hash), or its import fails.
    """
    path = Path(file)
    if not path.is_file():
        raise ModelLoadError(f"model file {file!r} not found (expected path/to/file.py:factory)")
    source = read_regular(path, f"model file {file!r}", current_limits().model_file_bytes, "model_file_bytes")
    digest = hashlib.sha256(source).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ModelLoadError(
            f"model file {file!r} is not the file this model was saved with (sha256 {digest} now, "
            f"{sha256} when saved); not running it. Restore the saved file, or rebuild the model and save it again"
        )
    cache = _RUN_ONCE.get()
    key = (str(path.absolute()), digest)
    if cache is not None and key in cache:
        return cache[key]
    module = _run_source(path, file, source)
    if cache is not None:
        cache[key] = module
    return module


def model_from_file(spec: str, kwargs: Mapping[str, Any], *, sha256: str | None = None) -> nn.Module:
    """The model ``path/to/file.py:factory`` builds with ``kwargs``. With ``sha256`` (a
    recipe read from a save records it) the file's bytes must have that hash; they are the
    bytes that run.

    Raises:
        ModelLoadError: the file is missing, unreadable or another file (hash), its import or
            factory fails, or the factory does not take the arguments.
    """
    file, factory = split_file_spec(spec)
    kwargs = dict(kwargs)
    module = run_model_file(file, sha256)
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ModelLoadError(f"{file!r} has no callable {factory!r} (callables there: {', '.join(found) or 'none'})")
    _check_factory_args(fn, spec, kwargs)
    try:
        model = fn(**kwargs)
    except RetrofitError:
        raise
    except Exception as e:
        got = f" (called with {_show(kwargs)})" if kwargs else ""
        raise ModelLoadError(f"{spec} failed{got}: {type(e).__name__}: {first_line(e)}; the error is in the "
                             f"factory's code in {file!r}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _from_framework(spec: str, pretrained: bool, num_classes: int | None, trust_code: bool,
                    kwargs: dict[str, Any]) -> nn.Module | None:
    """A model of Ultralytics, transformers or smp (``PREFIX:NAME``), recorded as its library
    describes it (a config or yaml as data, never the file or checkpoint it came from)."""
    found = framework_of_spec(spec)
    if found is None:
        return None
    framework, name = found
    args = dict(kwargs)
    if num_classes is not None:
        args[framework.num_classes_arg] = num_classes
    model = framework.build(name, pretrained=pretrained, trust_code=trust_code, **args)
    carried = get_recipe(model)
    if carried is not None and carried.rules is not None:
        return model  # a retrofitted model read from a checkpoint: it knows how it was built
    described = framework.describe(model)
    attach_recipe(model, Recipe() if described is None else Recipe(model=described[0], model_kwargs=described[1]))
    return model


def create_model(spec: str, pretrained: bool = False, num_classes: int | None = None, *, trust_code: bool = False,
                 **kwargs: Any) -> nn.Module:
    """Build the model named by ``spec``, and record how (``retrofit.save`` and fine-tuning
    checkpoints of a retrofit of it then know which model to build again).

    Args:
        spec: a timm model name (``resnet50``), ``hf-hub:org/name`` (a timm model on the
            Hugging Face Hub: a base model; a retrofit save on the Hub is read by
            :func:`retrofit.load`), ``torchvision:NAME``, ``path/to/file.py:factory`` for a
            user's own model, or a model of another library:
            ``ultralytics:yolov8n.yaml`` (a model yaml Ultralytics ships, or a path to
            one; ``ultralytics:best.pt`` reads a checkpoint, a pickle, with ``trust_code``),
            ``transformers:ResNetForImageClassification`` (its default config; keyword
            arguments set config fields), ``transformers:path/to/folder`` (a folder holding
            a ``config.json``) or ``transformers:ORG/NAME`` (a Hub repository), and
            ``smp:Unet`` (segmentation_models_pytorch; ``encoder_name="resnet34"``, ...).
        pretrained: download pretrained weights (needs the network).
        num_classes: classifier size, where the model takes it (transformers'
            ``num_labels``, smp's ``classes``, Ultralytics' ``nc``).
        trust_code: allow a spec that runs code when read (an Ultralytics ``.pt``).
        kwargs: further arguments for the model's constructor or factory.

    Without a network (no TCP connection to the weights' host within a few seconds) the
    weights come from the local cache or the call fails at once, saying so.

    Raises:
        ModelLoadError: the name is unknown (with the closest names), a file or factory is
            missing, the factory does not take the arguments or fails, or weights cannot be
            downloaded.
        OptionError: a negative ``num_classes``.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 0):
        raise OptionError(f"num_classes = {num_classes!r} is not valid: the classifier's size, an integer >= 1 "
                          "(0 removes the classifier, where the model supports it)")
    if pretrained and is_file_spec(spec):
        raise ModelLoadError(f"--pretrained needs a timm or torchvision model; {spec!r} is a file (use --checkpoint)")
    if "device" in kwargs:  # a device that is not here fails deep in the builder otherwise
        check_device(kwargs["device"], "the model argument device", ModelLoadError)
    framework_model = _from_framework(spec, pretrained, num_classes, trust_code, kwargs)
    if framework_model is not None:
        return framework_model
    args = dict(kwargs) if num_classes is None else {**kwargs, "num_classes": num_classes}
    if spec.startswith("torchvision:"):
        model = _torchvision(spec.split(":", 1)[1], pretrained, **args)
    elif is_file_spec(spec.removeprefix("timm:")):
        spec = spec.removeprefix("timm:")
        model = model_from_file(spec, args)
    else:
        model = _timm(spec.removeprefix("timm:"), pretrained, **args)
    attach_recipe(model, Recipe().with_model(spec, args))
    return model
