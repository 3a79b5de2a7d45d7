"""Ultralytics YOLO: models built from their model yaml, as plain data.

An Ultralytics model keeps the yaml it was built from (``model.yaml``: layers, scale, class
count); a recipe holds that dict and the model class (``ultralytics:yolov8n.yaml`` +
``{"cfg": {...}, "model_class": "DetectionModel"}``). Building it again parses the dict
with Ultralytics' own ``parse_model``, which ``eval``s the activation string, looks every
layer name up in its module's globals and calls what it finds, and turns string arguments
into local variables or literals. So before Ultralytics sees a yaml, trusted or not, every
field it evaluates or looks up is checked against an allow-list (:func:`layer_problems`):
layer names must be layer classes of Ultralytics' own modules, ``torch.nn`` or
``torchvision.ops`` (never a whole-model class, which reads yaml files of its own);
the activation an element-wise ``torch.nn`` activation called with literals; arguments
literals, or the two names Ultralytics' yamls use (``nc``, ``kpt_shape``); the scales and the
number of layers they expand to within :class:`~retrofit.readfile.Limits`. A yaml file is
read by :func:`retrofit.readfile.read_yaml` (size and nesting capped, aliases refused),
never by Ultralytics' own reader. A recipe read from a save must carry its yaml as ``cfg``;
one that names a yaml file instead is refused without ``trust_code`` (and with it, the file
must lie inside the save). An Ultralytics checkpoint (``.pt``) is a pickle: reading one
runs code and needs ``trust_code``.
"""

from __future__ import annotations

import ast
import contextlib
import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ...errors import ModelLoadError, UntrustedCodeError, first_line
from ...meta import original_class
from ...readfile import current_limits, file_in_folder, read_yaml
from ...text import excerpt
from .._base import Framework, register_framework
from ._offline import offline

__all__: list[str] = []

# The model classes a recipe may name (ultralytics.nn.tasks), by the head that makes them.
MODEL_CLASSES = ("DetectionModel", "SegmentationModel", "ClassificationModel", "PoseModel", "OBBModel",
                 "RTDETRDetectionModel", "WorldModel", "YOLOEModel", "YOLOESegModel", "SemanticSegmentationModel",
                 "DepthModel")
_TASK_CLASSES = {"detect": "DetectionModel", "segment": "SegmentationModel", "classify": "ClassificationModel",
                 "pose": "PoseModel", "obb": "OBBModel", "semantic": "SemanticSegmentationModel",
                 "depth": "DepthModel"}
_HEAD_CLASSES = {"RTDETRDecoder": "RTDETRDetectionModel", "WorldDetect": "WorldModel", "YOLOEDetect": "YOLOEModel",
                 "YOLOESegment": "YOLOESegModel", "YOLOESegment26": "YOLOESegModel"}


def _module_class(name: str, trusted: bool = False) -> type[nn.Module] | None:
    """The layer class a yaml layer name resolves to in Ultralytics' parse_model, if it is one
    a yaml may name: a layer of Ultralytics' own modules (``ultralytics.nn.modules``), of
    ``torch.nn`` or of ``torchvision.ops``. With ``trusted``, also another ``nn.Module``
    class found where parse_model looks (a layer the user added to Ultralytics' namespace),
    but never a whole-model class (those read yaml files of their own)."""
    import torch
    import torchvision
    from ultralytics.nn import tasks

    if name.startswith("nn."):
        obj, home = getattr(torch.nn, name[3:], None), "torch.nn.modules."
    elif name.startswith("torchvision.ops."):
        obj, home = getattr(torchvision.ops, name[16:], None), "torchvision.ops."
    else:
        obj, home = vars(tasks).get(name), "ultralytics.nn.modules."
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        return None
    if obj.__module__.startswith(home):
        return obj
    return obj if trusted and home.startswith("ultralytics") and not issubclass(obj, tasks.BaseModel) else None


# The activations a yaml may set (``activation: nn.SiLU()``): element-wise torch.nn layers,
# called with literal numbers, booleans or strings (``nn.LeakyReLU(0.1)``, ``nn.GELU(approximate="tanh")``).
_ACTIVATIONS = frozenset({"ReLU", "ReLU6", "LeakyReLU", "SiLU", "GELU", "Hardswish", "Hardsigmoid", "Sigmoid",
                          "Tanh", "Mish", "ELU", "SELU", "CELU", "Softplus", "Hardtanh", "Identity", "Tanhshrink",
                          "Softsign", "LogSigmoid"})
# String arguments parse_model replaces by its local variable of that name: the two that
# Ultralytics' own yamls use. Any other local (the whole config, the layer list, ...) is refused.
_ARG_NAMES = frozenset({"nc", "kpt_shape"})
_MAX_ARG_TEXT = 256  # characters of a string argument (Ultralytics' are a word: "nearest", "None")
_MAX_ARG_DEPTH = 4  # nesting of an argument (lists of lists of ints at most, in Ultralytics' yamls)
_MAX_NUMBER = 1 << 20  # magnitude of a number in an argument or activation (channels, kernel sizes, ...)
_MAX_MULTIPLE = 16.0  # a depth or width multiple (Ultralytics' largest scales use 1.33 and 1.25)
_MAX_CHANNELS = 1 << 16  # a scale's max_channels (Ultralytics' use 512 to 2048)
_MAX_REPEATS = 64  # a layer's repeat count before the depth multiple (Ultralytics' use at most 9)


def _literal_number(node: ast.AST) -> bool:
    """A literal number, boolean, string or None, of a sane magnitude (``-1``, ``0.1``, ``True``)."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    if isinstance(value, str):
        return len(value) <= _MAX_ARG_TEXT
    return value is None or (isinstance(value, (int, float)) and abs(value) <= _MAX_NUMBER)


def _safe_activation(text: str) -> bool:
    """``nn.SiLU()``, ``torch.nn.LeakyReLU(0.1)``: an element-wise torch.nn activation
    called with literals, nothing else (Ultralytics ``eval``s this text)."""
    if len(text) > _MAX_ARG_TEXT:
        return False
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Attribute):
        return False
    base = tree.func.value
    named = (isinstance(base, ast.Name) and base.id == "nn") or (
        isinstance(base, ast.Attribute) and base.attr == "nn" and isinstance(base.value, ast.Name)
        and base.value.id == "torch")
    return (named and tree.func.attr in _ACTIVATIONS and all(_literal_number(a) for a in tree.args)
            and all(k.arg is not None and _literal_number(k.value) for k in tree.keywords))


def _arg_problem(value: Any, depth: int = 0) -> str | None:
    """Why a layer argument is not plain data parse_model may take, or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if abs(value) <= _MAX_NUMBER else f"the number {excerpt(value, 40)} is out of range"
    if isinstance(value, str):
        if len(value) > _MAX_ARG_TEXT:
            return f"a string argument of {len(value)} characters (at most {_MAX_ARG_TEXT})"
        if value in _ARG_NAMES:
            return None
        from ultralytics.nn.tasks import parse_model

        if value in parse_model.__code__.co_varnames:  # parse_model would pass its own variable
            return f"the string {value!r}, which Ultralytics replaces by its internal variable of that name"
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None  # stays a string ("nearest")
        return None if isinstance(parsed, str) else _arg_problem(parsed, depth)
    if isinstance(value, (list, tuple)):
        if depth >= _MAX_ARG_DEPTH:
            return f"an argument nested more than {_MAX_ARG_DEPTH} levels"
        return next((p for v in value if (p := _arg_problem(v, depth + 1)) is not None), None)
    return f"a {type(value).__name__} argument ({excerpt(value, 40)})"


def _number(cfg: Mapping[str, Any], key: str, low: float, high: float, integer: bool = False) -> str | None:
    value = cfg.get(key)
    kind = int if integer else (int, float)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind) or not low < value <= high:
        return f"its {key} {excerpt(value, 40)} is not a number in ({low:g}, {high:g}]"
    return None


def _scale_problems(cfg: Mapping[str, Any]) -> tuple[list[str], float]:
    """What is wrong with a yaml's scales and multiples, and the depth multiple it builds with."""
    out = [p for key in ("depth_multiple", "width_multiple") if (p := _number(cfg, key, 0, _MAX_MULTIPLE))]
    depth = cfg.get("depth_multiple", 1.0)
    scales = cfg.get("scales")
    if scales is None:
        return out, depth if isinstance(depth, (int, float)) and not out else 1.0
    if not isinstance(scales, Mapping) or not scales:
        return [*out, f"its scales {excerpt(scales, 60)} are not a table of [depth, width, max_channels]"], 1.0
    for name, row in scales.items():
        if not (isinstance(row, list) and len(row) == 3 and all(isinstance(v, (int, float))
                                                                and not isinstance(v, bool) for v in row)):
            out.append(f"its scale {excerpt(name, 20)} is {excerpt(row, 60)}, not [depth, width, max_channels]")
        elif not (0 < row[0] <= _MAX_MULTIPLE and 0 < row[1] <= _MAX_MULTIPLE and 0 < row[2] <= _MAX_CHANNELS):
            out.append(f"its scale {excerpt(name, 20)} is {excerpt(row, 60)}: depth and width multiples must lie "
                       f"in (0, {_MAX_MULTIPLE:g}] and max_channels in (0, {_MAX_CHANNELS}]")
    scale = cfg.get("scale") or next(iter(scales))
    row = scales.get(scale) if isinstance(scale, str) else None
    if row is None:
        out.append(f"its scale {excerpt(scale, 20)} is not one of its scales ({', '.join(map(str, scales))})")
    return out, row[0] if not out and row is not None else 1.0


def layer_problems(cfg: Any, trusted: bool = False) -> list[str]:
    """What in an Ultralytics model yaml (a dict) is not plain model data: what
    :func:`code_problems` finds, then scales out of range and more layers than
    ``Limits.model_layers`` (a model that would take hours to build). Empty: building it
    runs no code but Ultralytics' layers, in bounded time."""
    out = code_problems(cfg, trusted)
    if out or not isinstance(cfg, Mapping):
        return out
    scale_problems, depth = _scale_problems(cfg)
    out += scale_problems
    out += [p for key in ("reg_max", "channels") if (p := _number(cfg, key, 0, 1024, integer=True))]
    for i, layer in enumerate(_layers(cfg)):
        if layer[1] > _MAX_REPEATS:
            out.append(f"layer {i} repeats {layer[1]} times, not 1 to {_MAX_REPEATS}")
    if out:
        return out
    built = sum((max(round(layer[1] * depth), 1) if layer[1] > 1 else layer[1]) for layer in _layers(cfg))
    cap = current_limits().model_layers
    if built > cap:
        out.append(f"its layers expand to {built} modules with its depth multiple {depth:g}, over the limit of {cap} "
                   "(Limits.model_layers)")
    kpt = cfg.get("kpt_shape")
    if kpt is not None and not (isinstance(kpt, list) and len(kpt) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 for v in kpt)):
        out.append(f"its kpt_shape {excerpt(kpt, 40)} is not [keypoints, dims]")
    return out


def _layers(cfg: Mapping[str, Any]) -> list[list[Any]]:
    return [layer for part in ("backbone", "head") if isinstance(cfg.get(part), list) for layer in cfg[part]]


def code_problems(cfg: Any, trusted: bool = False) -> list[str]:
    """What in an Ultralytics model yaml would make Ultralytics run more than its layers:
    layer names that are not layer classes, an activation that is not an element-wise
    ``torch.nn`` call with literals, arguments that are not literals, a malformed layer list.
    ``trusted`` (the user passed ``trust_code``) admits layer classes added to Ultralytics'
    namespace; nothing else changes."""
    if not isinstance(cfg, Mapping):
        return [f"the model yaml is a {type(cfg).__name__}, not a table"]
    out: list[str] = []
    layers = []
    for part in ("backbone", "head"):
        value = cfg.get(part, [])
        if not isinstance(value, list):
            out.append(f"its {part!r} is a {type(value).__name__}, not a list of layers")
            continue
        layers += [(part, i, layer) for i, layer in enumerate(value)]
    if not layers:
        out.append("it has no layers (backbone, head)")
    for part, i, layer in layers:
        if not (isinstance(layer, list) and len(layer) == 4 and isinstance(layer[2], str)
                and isinstance(layer[3], list)):
            out.append(f"{part} layer {i} is not [from, repeats, module, [args]]: {excerpt(layer, 80)}")
            continue
        frm, n, name, args = layer
        if not (isinstance(frm, int) or (isinstance(frm, list) and frm and all(isinstance(f, int) for f in frm))) \
                or isinstance(frm, bool):
            out.append(f"{part} layer {i} takes its input from {excerpt(frm, 40)}, not a layer index or a list of them")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            out.append(f"{part} layer {i} repeats {excerpt(n, 40)} times, not a count >= 1")
        if _module_class(name, trusted) is None:
            out.append(f"{part} layer {i} names {excerpt(name, 60)}, which is not a layer class of Ultralytics, "
                       "torch.nn or torchvision.ops (Ultralytics would call it)")
        problem = _arg_problem(args)
        if problem is not None:
            out.append(f"{part} layer {i} ({name:.40}) has {problem}; arguments are literals, nc or kpt_shape")
    act = cfg.get("activation")
    if act is not None and not (isinstance(act, str) and _safe_activation(act)):
        out.append(f"its activation {excerpt(act, 60)} is not an element-wise torch.nn activation called with literals "
                   f"({', '.join(f'nn.{a}()' for a in sorted(_ACTIVATIONS)[:4])}, ...; Ultralytics evals it)")
    return out


def _is_checkpoint(name: str) -> bool:
    return Path(name).suffix in (".pt", ".pth")


def _shipped_yaml(name: str) -> Path | None:
    """The model yaml Ultralytics ships for ``name`` (``yolov8n.yaml`` is ``yolov8.yaml`` at
    scale n; a P6 name is renamed as Ultralytics renames it), looked up in the installed
    package's ``cfg`` folder only: never a file of that name in the current folder."""
    import re

    import ultralytics

    stem = Path(name).stem
    if Path(name).name != name or not re.fullmatch(r"[\w.-]+", stem):
        return None
    if stem in (f"yolov{d}{x}6" for x in "nsmlx" for d in (5, 8)):
        stem = re.sub(r"(\d+)([nslmx])6(.+)?$", r"\1\2-p6\3", stem)
    root = Path(ultralytics.__file__).parent / "cfg"
    for candidate in (stem, re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", stem)):
        found = sorted(root.rglob(f"{candidate}{Path(name).suffix}"))
        if found:
            return found[0]
    return None


def _yaml_cfg(path: Path, name: str) -> dict[str, Any]:
    """A model yaml read as data, with what Ultralytics' ``yaml_model_load`` adds: the scale
    its name gives (``yolov8n`` is n) and the name it was read as."""
    from ultralytics.nn.tasks import guess_model_scale

    cfg = read_yaml(path, f"the Ultralytics model yaml {name!r}")
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"the Ultralytics model yaml {name!r} is a {type(cfg).__name__}, not a table of layers")
    return {**cfg, "scale": guess_model_scale(name), "yaml_file": name}


def _yaml_name(cfg: Mapping[str, Any], cls: str) -> str:
    file = cfg.get("yaml_file")
    return Path(file).name if isinstance(file, str) and file else f"{cls}.yaml"


class _MetaScalars(TorchFunctionMode):
    """Reading a number from a meta tensor gives 1.0. Ultralytics' constructor reads one
    value, the head's strides, to initialise the class biases (``Detect.bias_init``): only a
    value, never a shape. With this a model builds on the meta device, so a load compares
    its shapes with the weights file before anything real is allocated."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        if func in (torch.Tensor.item, torch.Tensor.__float__) and args and args[0].device.type == "meta":
            return 1.0
        return func(*args, **(kwargs or {}))


@register_framework
class Ultralytics(Framework):
    prefix = "ultralytics"
    package = "ultralytics"
    distribution = "ultralytics"
    num_classes_arg = "nc"
    traces_in_parts = True
    native_suffix, native_format = ".pt", "an Ultralytics checkpoint"
    folded_forward = "forward_fuse"  # what fuse() (run by val, predict, export) swaps in

    def describe(self, model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        cls = original_class(model)
        cfg = getattr(model, "yaml", None)
        if cls.__name__ not in MODEL_CLASSES or not cls.__module__.startswith("ultralytics.") \
                or not isinstance(cfg, Mapping) or layer_problems(cfg):
            return None
        kwargs: dict[str, Any] = {"cfg": copy.deepcopy(dict(cfg)), "model_class": cls.__name__}
        names = getattr(model, "names", None)
        default = {i: str(i) for i in range(len(names))} if isinstance(names, Mapping) else None
        if isinstance(names, Mapping) and names != default and all(isinstance(v, str) for v in names.values()):
            kwargs["names"] = {str(k): v for k, v in names.items()}
        return f"ultralytics:{_yaml_name(cfg, cls.__name__)}", kwargs

    def foreign_code(self, name: str, kwargs: Mapping[str, Any]) -> list[str]:
        if _is_checkpoint(name) and "cfg" not in kwargs:
            return [f"the Ultralytics checkpoint {name!r} (a pickle: reading it runs code)"]
        cfg = kwargs.get("cfg")
        if cfg is None:
            return [f"the Ultralytics model yaml {name!r}, read from a file the recipe names rather than carried in "
                    "it (a save carries its yaml as cfg)"]
        return [f"the Ultralytics model yaml: {p}" for p in code_problems(cfg)]

    def resolve(self, name: str, kwargs: Mapping[str, Any], folder: Path, where: str) -> tuple[str, dict[str, Any]]:
        # Reached for a recipe that names a file only with trust (foreign_code): the file must
        # lie in the save, and a yaml is read here, as data, never by Ultralytics.
        if "cfg" in kwargs:
            return name, dict(kwargs)
        if _is_checkpoint(name):
            return str(file_in_folder(folder, name, "the Ultralytics checkpoint", where)), dict(kwargs)
        path = file_in_folder(folder, name, "the Ultralytics model yaml", where)
        if path.is_file():
            cfg = _yaml_cfg(path, name)
        elif (shipped := _shipped_yaml(name)) is not None:
            cfg = _yaml_cfg(shipped, name)
        else:
            raise ModelLoadError(f"{where}: the recipe names the Ultralytics model yaml {name!r}, which is neither in "
                                 "the save nor a yaml Ultralytics ships; a save carries its yaml as cfg")
        return Path(name).name, {**kwargs, "cfg": cfg}

    def build(self, name: str, *, pretrained: bool = False, trust_code: bool = False, **kwargs: Any) -> nn.Module:
        self.require()
        if _is_checkpoint(name) and "cfg" not in kwargs:
            return self._checkpoint(name, trust_code, kwargs)
        if pretrained:
            raise ModelLoadError(f"ultralytics:{name}: pretrained weights come in a .pt checkpoint; name it "
                                 "(ultralytics:yolov8n.pt, with --trust-code: a checkpoint is a pickle)")
        cfg = kwargs.pop("cfg", None)
        model_class = kwargs.pop("model_class", None)
        names = kwargs.pop("names", None)
        nc = kwargs.pop("nc", None)
        ch = kwargs.pop("ch", None)
        if kwargs:
            raise ModelLoadError(f"ultralytics:{name} takes no argument {next(iter(kwargs))!r} (valid: nc, ch)")
        if cfg is None:
            cfg = self._read_yaml(name)
        # Checked whatever the trust: Ultralytics evals the activation and calls what a layer
        # name resolves to, so an expression in a yaml is code even in a file the user trusts.
        problems = layer_problems(cfg, trusted=trust_code)
        if problems:
            raise ModelLoadError(f"ultralytics:{name}: {problems[0]}. Nothing was built (a model yaml holds layers of "
                                 "Ultralytics, torch.nn or torchvision.ops with literal arguments)")
        classes, cap = nc if nc is not None else cfg.get("nc"), current_limits().classes
        if isinstance(classes, int) and classes > cap:
            raise ModelLoadError(f"ultralytics:{name}: {classes} classes (nc) is over the limit of {cap} "
                                 "(Limits.classes); nothing was built")
        from ultralytics.nn import tasks

        model_class = model_class or self._class_for(cfg)
        if model_class not in MODEL_CLASSES:
            raise ModelLoadError(f"ultralytics:{name}: unknown model class {model_class!r} (valid: "
                                 f"{', '.join(MODEL_CLASSES)})")
        cls = getattr(tasks, model_class, None)
        if cls is None:
            raise ModelLoadError(f"ultralytics:{name}: this Ultralytics has no {model_class}")
        cfg = copy.deepcopy(dict(cfg))
        try:
            meta = torch.get_default_device().type == "meta"
            with offline(), _MetaScalars() if meta else contextlib.nullcontext():
                model = cls(cfg=cfg, ch=ch or cfg.get("channels", 3), nc=nc, verbose=False)
        except Exception as e:  # noqa: BLE001 (parse_model raises KeyError, TypeError, ... on a bad yaml)
            raise ModelLoadError(f"cannot build ultralytics:{name}: {type(e).__name__}: {first_line(e)}") from e
        if isinstance(names, Mapping):
            model.names = {int(k): str(v) for k, v in names.items()}
        return model

    def on_result(self, result: nn.Module, recipe: Any) -> None:
        # A YOLO-World model keeps its classes' text embeddings (set_classes) in a plain tensor
        # attribute, outside the state dict: a save would drop them and its load would predict
        # with the constructor's random ones. As a buffer they are saved and loaded, and
        # Ultralytics' own code reads and assigns the attribute as before.
        feats = getattr(result, "txt_feats", None)
        if isinstance(feats, torch.Tensor) and "txt_feats" not in result._buffers:
            delattr(result, "txt_feats")
            result.register_buffer("txt_feats", feats)

    def _read_yaml(self, name: str) -> dict[str, Any]:
        """A model yaml Ultralytics ships (``yolov8n.yaml``: scale from the name) or a local
        file, read as data (:func:`retrofit.readfile.read_yaml`), never by Ultralytics."""
        if Path(name).suffix not in (".yaml", ".yml"):
            raise ModelLoadError(f"ultralytics:{name}: expected a model yaml (ultralytics:yolov8n.yaml) or a "
                                 "checkpoint (ultralytics:yolov8n.pt)")
        if "://" in name:
            raise ModelLoadError(f"ultralytics:{name}: a model yaml is read from this machine, not downloaded; give a "
                                 "local path or a yaml Ultralytics ships (yolov8n.yaml)")
        path = Path(name) if Path(name).is_file() else _shipped_yaml(name)
        if path is None:
            raise ModelLoadError(f"cannot read the Ultralytics model yaml {name!r}: no such file, and not a yaml "
                                 "Ultralytics ships (such as yolov8n.yaml or yolo11n-seg.yaml)")
        return _yaml_cfg(path, name)

    def _class_for(self, cfg: Mapping[str, Any]) -> str:
        from ultralytics.nn.tasks import guess_model_task

        head = cfg.get("head") or []
        last = head[-1][2] if head and isinstance(head[-1], list) and len(head[-1]) == 4 else ""
        if last in _HEAD_CLASSES:
            return _HEAD_CLASSES[last]
        return _TASK_CLASSES.get(guess_model_task(dict(cfg)), "DetectionModel")

    def _checkpoint(self, name: str, trust_code: bool, kwargs: Mapping[str, Any]) -> nn.Module:
        if not trust_code:
            raise UntrustedCodeError(f"ultralytics:{name} is an Ultralytics checkpoint, a pickle: reading it runs "
                                     "code. Nothing was read; load it only if you trust where it came from: "
                                     "trust_code=True in Python, --trust-code on the command line")
        if kwargs:
            raise ModelLoadError(f"ultralytics:{name}: a checkpoint takes no arguments ({', '.join(kwargs)})")
        if not Path(name).is_file():
            raise ModelLoadError(f"Ultralytics checkpoint {name!r} not found (weights do not download here; give "
                                 "a local .pt file)")
        from ultralytics.nn.tasks import load_checkpoint

        try:
            with offline():
                model, _ = load_checkpoint(name, device="cpu", fuse=False)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot read the Ultralytics checkpoint {name!r}: {type(e).__name__}: "
                                 f"{first_line(e)}") from e
        return model.float()

    @contextlib.contextmanager
    def offline(self) -> Iterator[None]:
        with offline():
            yield

    def save_native(self, model: nn.Module, path: str | Path, *, force: bool = False) -> Path:
        from .checkpoint import save_checkpoint

        return save_checkpoint(model, path, force=force)

    def native_hint(self, path: Path) -> str:
        return f"YOLO({str(path)!r}) loads it; retrofit.ultralytics.trainer(...) trains on from it"

    def title(self, name: str, kwargs: Mapping[str, Any]) -> str:
        return f"Ultralytics model `{name}` ({kwargs.get('model_class', 'built from its yaml')})"

    def stages(self, model: nn.Module) -> list[str] | None:
        layers = getattr(model, "model", None)
        if isinstance(layers, nn.Sequential):
            return [f"model.{i}" for i in range(len(layers))]
        return None
