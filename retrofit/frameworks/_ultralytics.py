"""Ultralytics YOLO: models built from their model yaml, as plain data.

An Ultralytics model keeps the yaml it was built from (``model.yaml``: layers, scale, class
count); a recipe holds that dict and the model class (``ultralytics:yolov8n.yaml`` +
``{"cfg": {...}, "model_class": "DetectionModel"}``). Building it again parses the dict
with Ultralytics' own ``parse_model``, after checking that every layer it names is a model
layer (an ``nn.Module`` class of Ultralytics, ``torch.nn`` or ``torchvision.ops``) and that
the activation is a ``torch.nn`` call with literal arguments: Ultralytics ``eval``s the
activation string and calls whatever a layer name resolves to, so a yaml from someone else
is otherwise code. An Ultralytics checkpoint (``.pt``) is a pickle: reading one runs code
and needs ``trust_code``.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ModelLoadError, UntrustedCodeError, first_line
from ..readfile import current_limits
from ._base import Framework, register_framework

__all__ = ["Ultralytics", "MODEL_CLASSES", "layer_problems"]

# The model classes a recipe may name (ultralytics.nn.tasks), by the head that makes them.
MODEL_CLASSES = ("DetectionModel", "SegmentationModel", "ClassificationModel", "PoseModel", "OBBModel",
                 "RTDETRDetectionModel", "WorldModel", "YOLOEModel", "YOLOESegModel", "SemanticSegmentationModel",
                 "DepthModel")
_TASK_CLASSES = {"detect": "DetectionModel", "segment": "SegmentationModel", "classify": "ClassificationModel",
                 "pose": "PoseModel", "obb": "OBBModel", "semantic": "SemanticSegmentationModel",
                 "depth": "DepthModel"}
_HEAD_CLASSES = {"RTDETRDecoder": "RTDETRDetectionModel", "WorldDetect": "WorldModel", "YOLOEDetect": "YOLOEModel",
                 "YOLOESegment": "YOLOESegModel", "YOLOESegment26": "YOLOESegModel"}


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Ultralytics without downloads or network checks, its messages (model summaries) on
    stderr: what it prints while building is not a result."""
    saved = os.environ.get("YOLO_OFFLINE")
    os.environ["YOLO_OFFLINE"] = "1"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is None:
            os.environ.pop("YOLO_OFFLINE", None)
        else:
            os.environ["YOLO_OFFLINE"] = saved


def _module_class(name: str) -> type[nn.Module] | None:
    """The nn.Module class a yaml layer name resolves to in Ultralytics' parse_model, or None."""
    import torch
    import torchvision
    from ultralytics.nn import tasks

    if name.startswith("nn."):
        obj = getattr(torch.nn, name[3:], None)
    elif name.startswith("torchvision.ops."):
        obj = getattr(torchvision.ops, name[16:], None)
    else:
        obj = vars(tasks).get(name)
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None


def _literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def _safe_activation(text: str) -> bool:
    """``nn.SiLU()``, ``torch.nn.LeakyReLU(0.1)``: a torch.nn layer called with literals."""
    import torch

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
    obj = getattr(torch.nn, tree.func.attr, None)
    return (named and isinstance(obj, type) and issubclass(obj, nn.Module)
            and all(_literal(a) for a in tree.args) and all(_literal(k.value) for k in tree.keywords))


def layer_problems(cfg: Any) -> list[str]:
    """What in an Ultralytics model yaml (a dict) is not plain model data: layer names that
    are not model layers, an activation that is not a ``torch.nn`` call with literals, a
    malformed layer list. Empty: building it runs no code but Ultralytics' layers."""
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
        if not (isinstance(layer, list) and len(layer) == 4 and isinstance(layer[2], str)):
            out.append(f"{part} layer {i} is not [from, repeats, module, args]: {layer!r:.80}")
        elif _module_class(layer[2]) is None:
            out.append(f"{part} layer {i} names {layer[2]!r:.60}, which is not an Ultralytics, torch.nn or "
                       "torchvision.ops layer class (Ultralytics would call it)")
    act = cfg.get("activation")
    if act is not None and not (isinstance(act, str) and _safe_activation(act)):
        out.append(f"its activation {act!r:.60} is not a torch.nn layer called with literals (Ultralytics evals it)")
    return out


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

    def describe(self, model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        cls = getattr(type(model), "_retrofit_original", type(model))
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
        if Path(name).suffix in (".pt", ".pth") and "cfg" not in kwargs:
            return [f"the Ultralytics checkpoint {name!r} (a pickle: reading it runs code)"]
        cfg = kwargs.get("cfg")
        if cfg is None:
            return []
        return [f"the Ultralytics model yaml: {p}" for p in layer_problems(cfg)]

    def build(self, name: str, *, pretrained: bool = False, trust_code: bool = False, **kwargs: Any) -> nn.Module:
        self.require()
        if Path(name).suffix in (".pt", ".pth") and "cfg" not in kwargs:
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
        problems = layer_problems(cfg)
        if problems and not trust_code:
            raise UntrustedCodeError(f"ultralytics:{name}: {problems[0]}. Nothing was built; load it only if you "
                                     "trust where it came from: trust_code=True in Python, --trust-code on the "
                                     "command line")
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
        """A model yaml Ultralytics ships (``yolov8n.yaml``: scale from the name) or a local file."""
        from ultralytics.nn.tasks import yaml_model_load

        if Path(name).suffix not in (".yaml", ".yml"):
            raise ModelLoadError(f"ultralytics:{name}: expected a model yaml (ultralytics:yolov8n.yaml) or a "
                                 "checkpoint (ultralytics:yolov8n.pt)")
        try:
            with offline():
                cfg = yaml_model_load(name)
        except Exception as e:  # noqa: BLE001 (FileNotFoundError, yaml errors, ...)
            raise ModelLoadError(f"cannot read the Ultralytics model yaml {name!r}: {type(e).__name__}: "
                                 f"{first_line(e)} (a yaml Ultralytics ships, such as yolov8n.yaml or "
                                 "yolo11n-seg.yaml, "
                                 "or a path to one)") from e
        return dict(cfg)

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

    def title(self, name: str, kwargs: Mapping[str, Any]) -> str:
        return f"Ultralytics model `{name}` ({kwargs.get('model_class', 'built from its yaml')})"

    def stages(self, model: nn.Module) -> list[str] | None:
        layers = getattr(model, "model", None)
        if isinstance(layers, nn.Sequential):
            return [f"model.{i}" for i in range(len(layers))]
        return None
