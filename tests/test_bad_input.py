"""Bad input: a clear error or a recorded skip, and nothing the user had is changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import retrofit
from retrofit import AttentionError, ModelLoadError, OptionError, RuleError, SiteError, get_report

from .conftest import build, cached


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool], list[str]]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [n for n, _ in model.named_modules()])


def _unchanged(model: nn.Module, snap) -> bool:
    sd, flags, names = snap
    return (model.state_dict().keys() == sd.keys() and all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
            and flags == [m.training for m in model.modules()] and names == [n for n, _ in model.named_modules()])


def test_no_sites() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4))
    snap = _snapshot(model)
    with pytest.raises(SiteError, match=r"has no residual adds and no conv blocks .*is it a CNN\?"):
        retrofit.retrofit(model, input_size=(3, 4, 4))
    assert _unchanged(model, snap)


def test_channels_smaller_than_the_reduction_work() -> None:
    """One channel with SE's 1/16 reduction rounds the bottleneck up to rd_divisor."""
    model = nn.Sequential(nn.Conv2d(3, 1, 3), nn.ReLU(), nn.Conv2d(1, 1, 3))
    for attn in ("se", "eca", "cbam"):
        report = get_report(retrofit.retrofit(model, attn, input_size=(3, 9, 7)))
        assert [r.channels for r in report.rows] == [1, 1] and report.max_abs_diff == 0.0


def test_impossible_attention_arguments_name_the_site() -> None:
    model = build("resnet18")
    snap = _snapshot(model)
    with pytest.raises(AttentionError, match=r"built-in 'se', rule 1 \(with attn_args \{'rd_channels': -1\}\): "
                       r"se: rd_channels = -1 is not valid: .* \(building 'se' for site 'layer1.0', 64 channels\)"):
        retrofit.retrofit(model, "se", attn_args={"rd_channels": -1}, input_size=64)
    with pytest.raises(AttentionError, match=r"built-in 'se', rule 1 \(with attn_args \{'act_layer': 'nope'\}\): "
                       r"se: unknown activation act_layer = 'nope'"):
        retrofit.plan(model, "se", attn_args={"act_layer": "nope"}, input_size=64)
    assert _unchanged(model, snap)


def test_model_arguments_and_factories(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=r"num_classes = -1 is not valid: the classifier's size, an integer >= 1"):
        retrofit.create_model("resnet18", num_classes=-1)
    (tmp_path / "m.py").write_text("import torch.nn as nn\n"
                                   "def build(width=8):\n"
                                   "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU())\n"
                                   "def fails():\n"
                                   "    raise ValueError('bad width')\n")
    with pytest.raises(ModelLoadError, match=r"m\.py:build takes no argument 'num_classes' \(from --num-classes\); "
                       r"its parameters: width\. Add a num_classes parameter"):
        retrofit.create_model(f"{tmp_path / 'm.py'}:build", num_classes=3)
    with pytest.raises(ModelLoadError, match=r"m\.py:fails failed: ValueError: bad width; the error is in the "
                       r"factory's code in '.*m\.py'"):
        retrofit.create_model(f"{tmp_path / 'm.py'}:fails")
    with pytest.raises(ModelLoadError, match=r"cannot build torchvision:resnet18 with depth=3: TypeError: .*'depth'"):
        retrofit.create_model("torchvision:resnet18", depth=3)


def test_leaf_module_names_are_checked() -> None:
    from retrofit.leaves import check_leaf_modules

    model = build("resnet18")
    check_leaf_modules(model, ["layer3.1", "BasicBlock", nn.Conv2d])
    with pytest.raises(OptionError, match=r"leaf module 'layer3.9' matches nothing in ResNet; did you mean "
                       r"'layer3.1'\? \(give a module path such as 'conv1', 'fc', or the class name"):
        check_leaf_modules(model, ["layer3.1", "layer3.9"])


def test_other_input_sizes_after_rewrite() -> None:
    """Sites are found at one size; the result runs, exactly, at others (odd and non-square)."""
    model = build("resnet18").eval()
    gm = retrofit.retrofit(model, "cbam", input_size=64).eval()
    for h, w in ((33, 47), (96, 64), (224, 224)):
        x = torch.randn(1, 3, h, w)
        assert torch.equal(gm(x), model(x))


def test_unknown_attention_in_rule_changes_nothing(tmp_path: Path) -> None:
    model = build("resnet18")
    snap = _snapshot(model)
    path = tmp_path / "r.toml"
    path.write_text('[[rule]]\nat = "residual-add"\nattn = "squeeze"\n')
    with pytest.raises(RuleError, match=r"rule 1: unknown attention 'squeeze'"):
        retrofit.retrofit(model, rules=path)
    assert _unchanged(model, snap)


def test_interrupted_rewrite_leaves_the_model_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("resnet18")
    snap = _snapshot(model)

    def interrupted(gm, placements, *args, **kwargs):
        gm.add_submodule("layer1.0.partial", nn.Identity())  # partway through
        raise KeyboardInterrupt

    monkeypatch.setattr("retrofit.rewrite.insert_attention", interrupted)
    with pytest.raises(KeyboardInterrupt):
        retrofit.retrofit(model, "se", input_size=64)
    assert _unchanged(model, snap)


def test_failed_verification_forward_leaves_the_model_alone() -> None:
    class Breaks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y.view(-1, 4 * 5 * 5)  # only works at 7x7 input

    model = Breaks().train()
    snap = _snapshot(model)
    with pytest.raises(retrofit.TraceError, match=r"shape propagation failed at node 'view'"):
        retrofit.retrofit(model, input_size=(3, 8, 8))
    assert _unchanged(model, snap)


def test_leaf_module_names_are_checked_in_python_too() -> None:
    model = cached("resnet18")
    with pytest.raises(OptionError, match=r"leaf module 'layer9' matches nothing in ResNet; did you mean 'layer4'\?"):
        retrofit.retrofit(model, "se", input_size=32, leaf_modules=["layer9"])
    with pytest.raises(OptionError, match=r"leaf module 'Bottleneck' matches nothing in ResNet"):
        retrofit.analyze(model, 32, leaf_modules=["Bottleneck"])
    assert retrofit.analyze(model, 32, leaf_modules=["layer4.1", "BasicBlock"]).sites
