"""Tracing: readable node names, leaf modules (timm's, torchvision's, the user's), clear errors."""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import retrofit
from retrofit import TraceError
from retrofit.trace import trace

from .conftest import cached


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: torch.fx cannot follow this
            return x
        return -x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), DataDependent())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x)) + x.mean(1, keepdim=True)


def test_nodes_carry_module_paths_and_readable_names() -> None:
    gm = trace(cached("resnet18"))
    names = {n.meta["qualname"] for n in gm.graph.nodes}
    assert {"layer1.0.conv1", "layer1.0.add", "layer1.1.add", "layer4.1.add", "fc"} <= names
    add = next(n for n in gm.graph.nodes if n.meta["qualname"] == "layer2.0.add")
    assert add.meta["module_path"] == "layer2.0"
    conv = next(n for n in gm.graph.nodes if n.meta["qualname"] == "layer2.0.conv1")
    assert conv.op == "call_module" and conv.meta["module_path"] == "layer2.0"


def test_repeated_ops_in_one_module_get_local_suffixes() -> None:
    class TwoAdds(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x + x) + x

    names = [n.meta["qualname"] for n in trace(nn.Sequential(TwoAdds())).graph.nodes]
    assert names == ["input_1", "0.add", "0.add_1", "output"]


def test_timm_leaf_modules_are_honoured() -> None:
    gm = trace(cached("efficientnet_b0"))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    # BatchNormAct2d is registered by timm as a no-trace module: it stays one node.
    assert "bn1" in targets and "blocks.0.0.bn1" in targets


def test_torchvision_blocks_are_traced_through() -> None:
    gm = trace(cached("tv:mobilenet_v3_large"))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert "features.0.0" in targets  # the conv inside Conv2dNormActivation
    assert "features.4.block.2.fc1" in targets  # inside torchvision's SqueezeExcitation


def test_user_leaf_by_class_name_path_and_type() -> None:
    for leaf in (["DataDependent"], ["body.2"], [DataDependent]):
        gm = trace(Net(), leaf)
        assert any(n.op == "call_module" and n.target == "body.2" for n in gm.graph.nodes)


def test_untraceable_model_names_module_line_and_fix() -> None:
    with pytest.raises(TraceError) as info:
        trace(Net())
    msg = str(info.value)
    assert "cannot trace Net: module 'body.2' (DataDependent)" in msg
    assert "test_trace.py:" in msg and "`if x.sum() > 0:  # data-dependent: torch.fx cannot follow this`" in msg
    assert "leaf_modules=['DataDependent']" in msg and "--leaf-module DataDependent" in msg
    assert isinstance(info.value, RuntimeError)


def test_untraceable_model_retrofits_with_leaf() -> None:
    # Without the leaf: the body traces with the module that does not trace called whole,
    # the stem (in the top-level forward) is out of reach, and the warning names the failure.
    with pytest.warns(UserWarning, match=r"Net does not trace as a whole.*module 'body.2' \(DataDependent\)"):
        partial = retrofit.retrofit(Net(), "se", input_size=16)
    assert [r.module for r in retrofit.get_report(partial).rows] == ["body.0_se"]
    gm = retrofit.retrofit(Net(), "se", input_size=16, leaf_modules=["DataDependent"])
    # Shape propagation runs the data-dependent leaf on real zeros; the sites are the convs.
    report = retrofit.get_report(gm)
    assert [r.module for r in report.rows] == ["stem_se", "body.0_se"]
    assert report.max_abs_diff == 0.0


def test_add_forms_are_all_recognised() -> None:
    class Forms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.convs[0](x)
            x = torch.add(self.convs[1](x), x)
            x = x.add(self.convs[2](x))
            y = self.convs[3](x)
            y += x
            z = self.convs[4](y)
            return z.add_(y)

    gm = trace(Forms())
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert targets == [operator.add, torch.add, "add", operator.add, "add_"]
    report = retrofit.get_report(retrofit.retrofit(Forms(), "se", input_size=(4, 6, 6)))
    assert [(r.kind, r.module) for r in report.rows] == [("residual-add", f"se{s}") for s in ("", "_1", "_2", "_3", "_4")]
    assert report.max_abs_diff == 0.0


class _ConvBN(nn.Module):
    """One conv→BN site; subclasses add optional forward inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)


def test_optional_inputs_are_traced_as_none() -> None:
    """``forward(x, mask=None)`` is analysed as the model is called: with its input alone."""

    class Masked(_ConvBN):
        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            if mask is not None:
                x = x * mask.view(x.shape[0], 1, *x.shape[2:])
            return self.bn(self.conv(x))

    model = Masked().eval()
    gm = retrofit.retrofit(model, "se", input_size=8)
    assert [r.path for r in retrofit.get_report(gm).rows] == ["conv"]
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x))
    with pytest.raises(AssertionError, match="mask has been specialized to have value None"):
        gm(x, torch.ones(2, 8, 8))
    with pytest.raises(AssertionError, match="mask has been specialized"):
        gm(x, mask=torch.ones(2, 8, 8))


def test_optional_bool_flags_are_traced_as_their_default() -> None:
    """timm's ViTs: ``forward(x, attn_mask=None, is_causal=False)`` branches on the flag."""

    class Flagged(_ConvBN):
        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    is_causal: bool = False) -> torch.Tensor:
            if attn_mask is not None or is_causal:
                x = x.flip(-1)
            return self.bn(self.conv(x))

    model = Flagged().eval()
    gm = retrofit.retrofit(model, "se", input_size=8)
    assert isinstance(gm, torch.fx.GraphModule) and retrofit.get_report(gm).left_alone == ()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x)) and torch.equal(gm(x, is_causal=False), model(x))
    with pytest.raises(AssertionError, match="is_causal has been specialized to have value False"):
        gm(x, is_causal=True)


def test_timm_vit_traces_as_a_whole() -> None:
    model = timm.create_model("test_vit", pretrained=False).eval()
    gm = retrofit.retrofit(model, "se")
    report = retrofit.get_report(gm)
    assert isinstance(gm, torch.fx.GraphModule) and report.left_alone == ()
    assert [r.path for r in report.rows] == ["patch_embed.proj"]
    x = torch.randn(1, 3, 160, 160)
    assert torch.equal(gm(x), model(x))


def test_a_trace_error_names_the_models_own_line_even_in_torchvision() -> None:
    # torchvision's folder name starts with torch's: its frames are the model's code, not torch's.
    model = retrofit.create_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3).eval()
    with pytest.raises(TraceError) as info:
        trace(model)
    e = info.value
    assert Path(e.file).name == "generalized_rcnn.py" and e.code == "for img in images:" and e.line
    assert (e.model, e.module, e.module_class) == ("FasterRCNN", "", "FasterRCNN")
    assert e.where.startswith("cannot trace FasterRCNN: the top-level forward of FasterRCNN at ")
