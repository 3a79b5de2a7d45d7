"""The before/after diff is right in every form: a GraphModule, ``keep_class``, ``inplace``
(which changes the model itself), a framework model, a loaded save. Each report is checked
against counts taken here, independently of retrofit: parameters of a fresh, unmodified
build of the same model and of the result, and the FLOPs of the unmodified model. (The
Ultralytics trainer's checkpoints are checked in test_ultralytics.py, on its training run.)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import retrofit

SIZE = 64


def _tiny_hf() -> nn.Module:
    return retrofit.create_model("transformers:ResNetForImageClassification", num_labels=3, embedding_size=16,
                                 hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])


# Built by retrofit.create_model, so that each names itself in a save.
MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm": lambda: retrofit.create_model("resnet10t", num_classes=10),
    "torchvision": lambda: retrofit.create_model("torchvision:resnet18", num_classes=10),
    "yolov8n": lambda: retrofit.create_model("ultralytics:yolov8n.yaml", nc=3),
    "transformers": _tiny_hf,
    "smp": lambda: retrofit.create_model("smp:Unet", encoder_name="resnet18", encoder_weights=None, classes=2),
}
FORMS: dict[str, dict[str, bool]] = {
    "graph": {},
    "keep_class": {"keep_class": True},
    "inplace": {"inplace": True},
    "inplace+keep_class": {"inplace": True, "keep_class": True},
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def _params(model: nn.Module) -> int:
    """Parameter elements, each tensor once however many modules share it."""
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return sum(p.numel() for p in unique.values())


def _flops(model: nn.Module) -> int:
    """FLOPs of one forward at the probe size, as torch counts them (the probe's batch is 1)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, SIZE, SIZE))
    return counter.get_total_flops()


def _retrofit(model: nn.Module, **kwargs: bool) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return retrofit.retrofit(model, "se", input_size=SIZE, **kwargs)


def _check(report: retrofit.Report, before: int, after: int) -> None:
    assert (report.params_before, report.params_after) == (before, after)
    assert report.params_added == sum(r.params for r in report.rows) > 0
    assert sum(s.params_before for s in report.stages) == before
    assert sum(s.params_after for s in report.stages) == after


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_report_counts_the_model_as_it_was_before(name: str, form: str) -> None:
    model = _build(name)
    before, flops = _params(model), _flops(model)  # taken first: inplace changes `model`
    out = _retrofit(model, **FORMS[form])
    report = retrofit.get_report(out)
    _check(report, before, _params(out))
    assert report.flops_before == flops and report.max_abs_diff == 0.0
    if FORMS[form].get("inplace"):
        # The model itself was rewritten (the partial path) or shares its parameters with
        # the result (a GraphModule): a second count of it no longer says "before".
        assert _params(model) in (before, _params(out))
    else:
        assert _params(model) == before  # not modified


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_loaded_save_reports_its_base_model(name: str, tmp_path: Path) -> None:
    out = _retrofit(_build(name))
    retrofit.save(out, tmp_path / "save")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = retrofit.load(tmp_path / "save")
    _check(retrofit.get_report(loaded), _params(_build(name)), _params(loaded))
    assert _params(loaded) == _params(out)
