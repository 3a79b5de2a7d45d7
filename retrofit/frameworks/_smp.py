"""segmentation_models_pytorch: segmentation models built from their constructor arguments.

smp records every model's constructor arguments (``model.config``); a recipe holds them as
plain data (``smp:Unet`` + ``{"encoder_name": "resnet34", ...}``) with
``encoder_weights=None``: weights come from the save, never from a download. ``--pretrained``
asks smp for its ImageNet encoder weights (which need the network).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import ModelLoadError, first_line
from ..meta import original_class
from ._base import Framework, register_framework

__all__: list[str] = []

CONFIG_KEY = "_retrofit"  # smp drops config keys that start with "_" when it builds a model


def _plain(value: Any) -> Any:
    """JSON's view of ``value`` (tuples become lists); raises TypeError for anything else."""
    return json.loads(json.dumps(value))


@register_framework
class SegmentationModels(Framework):
    prefix = "smp"
    package = "segmentation_models_pytorch"
    distribution = "segmentation-models-pytorch"
    num_classes_arg = "classes"
    config_file, config_key = "config.json", CONFIG_KEY  # save_pretrained writes the recipe there

    def describe(self, model: nn.Module) -> tuple[str, dict[str, Any]] | None:
        cls = original_class(model)
        config = getattr(model, "config", None)
        if not isinstance(config, dict):
            return None
        try:
            kwargs = _plain({k: v for k, v in config.items() if not k.startswith("_")})
        except (TypeError, ValueError):
            return None  # an argument that is an object (an activation class): not plain data
        kwargs["encoder_weights"] = None  # the weights are the model's own, saved beside the recipe
        return f"smp:{cls.__name__}", kwargs

    def foreign_code(self, name: str, kwargs: Mapping[str, Any]) -> list[str]:
        # smp builds a "tu-NAME" encoder with timm.create_model(NAME): a NAME of the form
        # local-dir:PATH makes timm read PATH/config.json from this machine.
        encoder = kwargs.get("encoder_name")
        if isinstance(encoder, str) and encoder.startswith("tu-local-dir:"):
            return [f"the encoder {encoder!r}, a timm model folder read from this machine"]
        return []

    def _class(self, name: str) -> type[nn.Module]:
        smp = self.require()
        cls = getattr(smp, name, None)
        if not (isinstance(cls, type) and issubclass(cls, smp.base.SegmentationModel)):
            names = sorted(n for n, v in vars(smp).items()
                           if isinstance(v, type) and issubclass(v, smp.base.SegmentationModel)
                           and v is not smp.base.SegmentationModel)
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ModelLoadError(f"smp has no architecture {name!r}{hint}"
                                 + f" (valid: {', '.join(names)})")
        return cls

    def build(self, name: str, *, pretrained: bool = False, trust_code: bool = False, **kwargs: Any) -> nn.Module:
        cls = self._class(name)
        if pretrained:
            kwargs.setdefault("encoder_weights", "imagenet")
            from ..download import unreachable

            why = unreachable("https://huggingface.co")
            if why:
                raise ModelLoadError(f"cannot download pretrained encoder weights for smp:{name}: no network "
                                     f"({why}); drop --pretrained")
        else:
            kwargs["encoder_weights"] = None  # smp's default would download ImageNet weights
        try:
            return cls(**kwargs)
        except Exception as e:  # noqa: BLE001 (smp raises KeyError, ValueError, TypeError, ... on bad arguments)
            got = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise ModelLoadError(f"cannot build smp:{name} with {got}: {type(e).__name__}: {first_line(e)}") from e

    def on_result(self, result: nn.Module, recipe: Any) -> None:
        config = getattr(result, "_hub_mixin_config", None)
        if isinstance(config, dict):  # written by save_pretrained into config.json; smp skips it on build
            config[CONFIG_KEY] = recipe.to_dict()
