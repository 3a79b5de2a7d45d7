"""Property-based fuzzing: random CNNs with every residual form the analysis must handle.

Random nets mix plain conv blocks, identity and projection residuals, nested residuals,
blocks with two adds, concatenations, and all the ways to write an add (``+``, ``+=``,
``torch.add``, ``Tensor.add``, ``Tensor.add_``), with odd channel counts and spatial sizes.
For every net and every attention type: the rewrite does not crash, the residual sites are
exactly the adds the net has, identity holds at init, and the parameter delta is exact.

The default run is bounded; ``pytest -m slow tests/test_fuzz.py`` runs the long one
(``RETROFIT_FUZZ_EXAMPLES``, default 5000).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import retrofit
from retrofit import get_report

from .test_attention import CLOSED_FORM

FORMS = ("op", "iadd", "torch", "method", "method_")
CHANNELS = (1, 3, 7)


def add(form: str, branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    if form == "op":
        return branch + shortcut
    if form == "iadd":
        branch += shortcut
        return branch
    if form == "torch":
        return torch.add(shortcut, branch)
    if form == "method":
        return shortcut.add(branch)
    return branch.add_(shortcut)


def conv(cin: int, cout: int, bn: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + f(x): identity shortcut, or a 1x1 projection when channels change."""

    def __init__(self, cin: int, cout: int, depth: int, form: str, bn: bool) -> None:
        super().__init__()
        self.form = form
        self.body = nn.Sequential(conv(cin, cout, bn), *[conv(cout, cout, bn) for _ in range(depth - 1)])
        self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj(x) if self.proj is not None else x
        return add(self.form, self.body(x), shortcut)


class Nested(nn.Module):
    """A residual whose branch holds another residual: two adds."""

    def __init__(self, c: int, form: str, bn: bool) -> None:
        super().__init__()
        self.form = form
        self.pre = conv(c, c, bn)
        self.inner = Residual(c, c, 1, form, bn)
        self.post = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add(self.form, self.post(self.inner(self.pre(x))), x)


class TwoAdds(nn.Module):
    """x + f(x) + g(x): two adds in one block."""

    def __init__(self, c: int, form: str, bn: bool) -> None:
        super().__init__()
        self.form = form
        self.f, self.g = conv(c, c, bn), conv(c, c, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = add(self.form, self.f(x), x)
        return y + self.g(x)


class Concat(nn.Module):
    """Two branches concatenated, then a 1x1 conv: no add."""

    def __init__(self, cin: int, cout: int, bn: bool) -> None:
        super().__init__()
        self.a, self.b = conv(cin, cout, bn), conv(cin, cout, bn)
        self.merge = nn.Conv2d(2 * cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(torch.cat([self.a(x), self.b(x)], dim=1))


@st.composite
def nets(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, int, int], int]:
    """A random net, its input size, and the number of residual adds it has."""
    cin = draw(st.sampled_from(CHANNELS))
    size = (cin, draw(st.sampled_from((1, 5, 7))), draw(st.sampled_from((1, 5, 7))))
    bn = draw(st.booleans())
    blocks: list[nn.Module] = [conv(cin, c := draw(st.sampled_from(CHANNELS)), bn)]
    adds = 0
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("plain", "identity", "projection", "nested", "two_adds", "concat")))
        form = draw(st.sampled_from(FORMS))
        out = draw(st.sampled_from(CHANNELS)) if kind in ("plain", "projection", "concat") else c
        if kind == "plain":
            blocks.append(conv(c, out, bn))
        elif kind in ("identity", "projection"):
            blocks.append(Residual(c, out, draw(st.integers(1, 2)), form, bn))
            adds += 1
        elif kind == "nested":
            blocks.append(Nested(c, form, bn))
            adds += 2
        elif kind == "two_adds":
            blocks.append(TwoAdds(c, form, bn))
            adds += 2
        else:
            blocks.append(Concat(c, out, bn))
        c = out
    torch.manual_seed(draw(st.integers(0, 2**16)))
    net = nn.Sequential(*blocks)
    with torch.no_grad():  # trained-like norms, so branches are not constant
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0.0, 0.1)
    return net, size, adds


def check(net: nn.Module, size: tuple[int, int, int], adds: int) -> None:
    analysis = retrofit.analyze(net, input_size=size)
    assert len(analysis.of_kind("residual-add")) == adds
    for attn in ("se", "eca", "cbam"):
        gm = retrofit.retrofit(net, attn, input_size=size)
        report = get_report(gm)
        assert len(report.rows) == (adds or len(analysis.of_kind("conv-block")))
        assert report.max_abs_diff == 0.0
        assert report.params_added == sum(CLOSED_FORM[attn](r.channels) for r in report.rows)
        gm.graph.lint()


@given(nets())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_cnns(spec: tuple[nn.Module, tuple[int, int, int], int]) -> None:
    check(*spec)


@pytest.mark.slow
@given(nets())
@settings(max_examples=int(os.environ.get("RETROFIT_FUZZ_EXAMPLES", "5000")), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_random_cnns_long(spec: tuple[nn.Module, tuple[int, int, int], int]) -> None:
    check(*spec)
