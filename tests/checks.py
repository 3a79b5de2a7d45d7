"""Checks shared by the attention and export tests: training reaches every parameter, and a
compiled or exported model computes what the eager one does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


def assert_every_parameter_learns(m: nn.Module, channels: int) -> None:
    """Two SGD steps on a random target give every parameter of ``m`` a non-zero gradient.

    Two, not one: behind an identity-initialised gate (a zero weight) the branch gets its
    first gradient only once the gate has moved.
    """
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    seen = {n: False for n, _ in m.named_parameters()}
    x, target = torch.randn(4, channels, 6, 6), torch.randn(4, channels, 6, 6)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(m(x), target).backward()
        for n, p in m.named_parameters():
            seen[n] |= bool(p.grad is not None and p.grad.abs().sum() > 0)
        opt.step()
    assert seen and all(seen.values()), seen


def assert_compiles_like_eager(model: nn.Module, x: torch.Tensor, atol: float = 1e-6) -> None:
    """``torch.compile(fullgraph=True)`` (aot_eager: no C++ build) captures ``model`` in one
    graph whose outputs and gradients match eager mode."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=atol)
    model.train()
    compiled(x).square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def assert_onnx_matches(model: nn.Module, x: torch.Tensor) -> None:
    """The dynamo ONNX export of ``model`` runs in onnxruntime and gives its eager output."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model.eval()
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)
