"""Retrofitted models compile whole (torch.compile, fullgraph) and export to ONNX."""

from __future__ import annotations

import pytest
import torch

import retrofit
from retrofit.fuse import gated_residual

from .checks import assert_compiles_like_eager, assert_onnx_matches
from .conftest import cached
from .test_fuse import TinyResNet


def _tiny(attn: str) -> torch.fx.GraphModule:
    """A two-block model: one add fuses with the gate, the other (in place) keeps the call."""
    torch.manual_seed(0)
    gm = retrofit.retrofit(TinyResNet(), attn, input_size=16)
    with torch.no_grad():  # move the gates off identity, so the check sees them work
        for row in retrofit.get_report(gm).rows:
            for p in gm.get_submodule(row.module).parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return gm


def _has_fused(gm: torch.fx.GraphModule) -> bool:
    return any(n.target is gated_residual for n in gm.graph.nodes)


@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_compile_fullgraph_forward_and_backward(attn: str) -> None:
    """Dynamo captures the fused adds in one graph (aot_eager: no C++ build, seconds)."""
    gm = _tiny(attn)
    assert _has_fused(gm)
    x = torch.randn(2, 3, 16, 16)
    assert_compiles_like_eager(gm, x)


@pytest.mark.slow
def test_compile_inductor_resnet18() -> None:
    """The real compiler on a real model (minutes on two cores: C++ kernels are built)."""
    gm = retrofit.retrofit(cached("resnet18"), "cbam", input_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(gm, fullgraph=True)(x), gm(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_onnx_export_runs_in_onnxruntime(attn: str) -> None:
    gm = _tiny(attn)
    assert_onnx_matches(gm, torch.randn(2, 3, 16, 16))


def test_onnx_export_resnet18_cbam() -> None:
    gm = retrofit.retrofit(cached("resnet18"), "cbam", input_size=32)
    assert _has_fused(gm)
    assert_onnx_matches(gm, torch.randn(2, 3, 32, 32))


def test_keep_class_compiles_and_exports() -> None:
    """The in-place form: blocks with generated forwards compile whole and export to ONNX."""
    torch.manual_seed(0)
    kept = retrofit.retrofit(cached("resnet18"), "cbam", input_size=32, keep_class=True)
    with torch.no_grad():
        for row in retrofit.get_report(kept).rows:
            for p in kept.get_submodule(row.module).parameters():
                p.add_(torch.randn_like(p) * 0.1)
    kept.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(kept, fullgraph=True, backend="aot_eager")(x), kept(x),
                                   rtol=1e-5, atol=1e-5)
    assert_onnx_matches(kept, x)
