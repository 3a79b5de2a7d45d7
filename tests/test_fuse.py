"""Fused gates: the residual add does the gate's multiply; same results as the module call."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from torch import nn

import retrofit
from retrofit import create_attention, get_report
from retrofit.attention import Cbam, EfficientChannelAttn, SqueezeExcite
from retrofit.fuse import gate_methods, gated_residual
from retrofit.modes import eval_mode
from retrofit.rulefile import parse_rules
from retrofit.trace import trace

from .conftest import cached

# (model, attn, input size): the three gate types on bottleneck and basic blocks, timm's
# and torchvision's. test_retrofit's zoo covers the other block types, fused by default.
CASES = [
    ("resnet50", "se", 32),
    ("resnet18", "cbam", 32),
    ("tv:resnet18", "eca", 32),
]


def _fused(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is gated_residual]


def _called(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}


def _perturb(gm: torch.fx.GraphModule, scale: float, seed: int = 1) -> None:
    """Move every inserted module's parameters off their init, as fine-tuning would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for row in get_report(gm).rows:
            for p in gm.get_submodule(row.module).parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale)


@functools.cache
def _built(name: str, attn: str, size: int) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    model = cached(name)
    # The inserted modules' random layers, whatever tests ran before: with other draws both
    # forms' layer1.1.cbam.fc1 gradients were all zero (dead ReLUs), and the ratio below 0/0.
    torch.manual_seed(0)
    fused = retrofit.retrofit(model, attn, input_size=size)
    plain = retrofit.retrofit(model, attn, input_size=size, fuse=False, verify=False)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _pair(name: str, attn: str, size: int) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The fused and the unfused rewrite of one model, with the same parameters (fresh copies)."""
    fused, plain = _built(name, attn, size)
    return copy.deepcopy(fused), copy.deepcopy(plain)


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of floats at each element of ``t``."""
    t = t.abs()
    return torch.nextafter(t, torch.tensor(float("inf"))) - t


@pytest.mark.parametrize("name,attn,size", CASES)
def test_fused_graph_is_the_unfused_one_with_fewer_passes(name: str, attn: str, size: int) -> None:
    fused, plain = _pair(name, attn, size)
    rows = get_report(fused).rows
    # Same report rows, modules, parameters and state-dict keys; only the graph differs.
    assert [r.to_dict() for r in rows] == [r.to_dict() for r in get_report(plain).rows]
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert get_report(fused).params_after == get_report(plain).params_after
    # Every inserted module sits on a residual branch before an out-of-place add: all fuse.
    nodes = _fused(fused)
    assert len(nodes) == len(rows) > 0 and not _fused(plain)
    assert {str(n.args[0].target) for n in nodes} == {r.module for r in rows}
    assert not {r.module for r in rows} & _called(fused)
    assert {r.module for r in rows} <= _called(plain)
    fused.graph.lint()
    # Exact identity at init, fused and unfused alike.
    assert get_report(fused).max_abs_diff == 0.0
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    model = cached(name)
    with torch.no_grad(), eval_mode(model, fused, plain):
        want = model(x)
        assert torch.equal(fused(x), want) and torch.equal(plain(x), want)


@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_every_fused_add_is_within_one_rounding_of_the_module_call(attn: str) -> None:
    """Node by node, on the inputs each fused add really sees, after the gates moved."""
    fused, _ = _pair("resnet18", attn, 32)
    _perturb(fused, 0.1)
    seen: list[tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    class Recorder(torch.fx.Interpreter):
        def call_function(self, target, args, kwargs):  # type: ignore[no-untyped-def]
            if target is not gated_residual:
                return super().call_function(target, args, kwargs)
            # Cloned: the fused add may write into the branch, the block's ReLU into the sum.
            branch, shortcut = args[1].clone(), args[2].clone()
            out = super().call_function(target, args, kwargs)
            seen.append((args[0], branch, shortcut, out.clone()))
            return out

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), eval_mode(fused):
        Recorder(fused).run(x)
        assert len(seen) == 8
        for module, branch, shortcut, out in seen:
            want = module(branch) + shortcut
            # addcmul rounds s + x * g once (on CPU a fused multiply-add); mul then add
            # round the product x * g first. Not bit-equal once g != 1, but apart by at
            # most the product's rounding plus the sum's.
            assert not torch.equal(out, want)
            assert ((out - want).abs() <= _ulp(want - shortcut) + _ulp(want)).all()
            torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_perturbed_model_outputs_and_gradients_match_unfused() -> None:
    fused, plain = _pair("resnet18", "cbam", 32)
    _perturb(fused, 0.01)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # Eval mode: train-mode BatchNorm on a batch of two 1x1 maps (layer4 at 32x32)
    # divides by a near-zero spread and magnifies any rounding without bound.
    fused.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    for gm in (fused, plain):
        gm(x).square().mean().backward()
    for (n, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
        err = torch.linalg.vector_norm(a.grad - b.grad) / torch.linalg.vector_norm(b.grad)
        assert err < 1e-4, f"{n}: relative gradient difference {err:.2e}"  # seen: 2e-6 at most
    want = torch.cat([p.grad.flatten() for p in plain.parameters()])
    got = torch.cat([p.grad.flatten() for p in fused.parameters()])
    assert torch.linalg.vector_norm(got - want) <= 1e-5 * torch.linalg.vector_norm(want)  # seen: 5e-7


def test_gradients_reach_every_gate_and_are_equal_at_init() -> None:
    fused, plain = _pair("resnet18", "se", 32)
    fused.train(), plain.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    opts = [torch.optim.SGD(gm.parameters(), lr=0.1) for gm in (fused, plain)]
    for step in range(2):
        for gm, opt in zip((fused, plain), opts, strict=True):
            opt.zero_grad()
            gm(x).square().mean().backward()
        if step == 0:
            # Identical forward at init; addcmul's backward is mul's: identical gradients.
            for (n, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
                assert torch.equal(a.grad, b.grad), n
        for opt in opts:
            opt.step()
    for row in get_report(fused).rows:
        for n, p in fused.get_submodule(row.module).named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{row.module}.{n}"


def test_hooks_and_replaced_modules_are_honoured() -> None:
    fused, plain = _pair("resnet18", "eca", 32)
    x = torch.randn(2, 3, 32, 32)
    fused.eval(), plain.eval()
    calls: list[tuple[int, ...]] = []
    handle = fused.get_submodule("layer2.1.eca").register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    with torch.no_grad():
        # A module with hooks of its own is called as a module, so its hooks fire.
        assert torch.equal(fused(x), plain(x))
        assert calls == [(2, 128, 4, 4)]
        handle.remove()
        fused(x)
        assert len(calls) == 1
        # A module the user swapped out is called, whatever it is now.
        for gm in (fused, plain):
            gm.get_submodule("layer2.1").eca = nn.Identity()
        assert torch.equal(fused(x), plain(x))


def test_without_autograd_the_sum_reuses_the_branch_memory() -> None:
    fused, _ = _pair("resnet18", "cbam", 32)
    # Branches made by a BatchNorm with one reader are donated; a layer-scale multiply is
    # not known to make a new tensor, so it is not.
    assert all(n.args[3] is True for n in _fused(fused))
    torch.manual_seed(0)
    scaled = retrofit.retrofit(TinyResNet(layer_scale=True), "se", input_size=16)
    assert [n.args[3] for n in _fused(scaled)] == [False]
    module = fused.get_submodule("layer1.0.cbam")
    _perturb(fused, 0.1)
    module.eval()
    branch, shortcut = torch.randn(2, 64, 8, 8), torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        want = gated_residual(module, branch, shortcut, False)
        mine = branch.clone()
        got = gated_residual(module, mine, shortcut, True)
        assert torch.equal(got, want) and got.data_ptr() == mine.data_ptr()
    # With autograd the inputs are kept for backward and never written.
    mine = branch.clone().requires_grad_()
    got = gated_residual(module, mine, shortcut, True)
    assert torch.equal(mine.detach(), branch) and torch.equal(got.detach(), want)
    got.sum().backward()
    assert mine.grad is not None


class _HalfGate(nn.Module):
    """A user's gate that declares its forward is ``x * scale(x)``."""

    fused_gates = ("scale",)

    def __init__(self, channels: int, **_: object) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((channels,), 0.5))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.view(1, -1, 1, 1).expand(x.shape[0], -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x)


class _NoLongerAGate(SqueezeExcite):
    """A user's subclass that changes forward but not the declaration it inherits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x) + 1.0


class _StillAGate(SqueezeExcite):
    """A subclass that changes forward and declares it again."""

    fused_gates = ("scale",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x)


class _SameForward(SqueezeExcite):
    """A subclass that keeps forward (and so the declaration)."""

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return super().scale(x) * 0.5


def test_a_declaration_holds_for_the_forward_it_was_written_beside() -> None:
    assert gate_methods(_NoLongerAGate(8)) is None
    assert gate_methods(_StillAGate(8)) == ("scale",)
    assert gate_methods(_SameForward(8)) == ("scale",)
    b, s = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        m = _NoLongerAGate(8)
        assert torch.equal(gated_residual(m, b, s), m(b) + s)  # called, not fused


def test_gc_is_a_gate_with_scale_fusion_alone() -> None:
    assert gate_methods(create_attention("gc", 8)) is None
    assert gate_methods(create_attention("gc", 8, fuse_scale=True)) is None  # x * gate + term
    assert gate_methods(create_attention("gc", 8, fuse_add=False, fuse_scale=True)) == ("scale",)
    for name in ("nonlocal", "chsa", "psa"):
        assert gate_methods(create_attention(name, 8)) is None


@pytest.mark.parametrize("model,attn,size", CASES)
def test_torchscript_of_a_fused_result(model: str, attn: str, size: int) -> None:
    """torch.jit.script works on the default (fused) output and computes what eager does:
    bit for bit at init, and once the gates moved bit for bit what the unfused form does
    (TorchScript calls the module and adds), also after a save and load."""
    import io
    import warnings

    fused, plain = _pair(model, attn, size)
    assert _fused(fused)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    fused.eval(), plain.eval()
    with warnings.catch_warnings():
        # torch deprecates TorchScript (FutureWarning) and remarks on timm's __init__ annotations
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(fused)
    with torch.no_grad():
        assert torch.equal(scripted(x), fused(x))
    _perturb(fused, 0.05)
    plain.load_state_dict(fused.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(fused)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    with torch.no_grad():
        want = plain(x)
        assert not torch.equal(want, x.new_zeros(()).expand_as(want))
        assert torch.equal(scripted(x), want) and torch.equal(loaded(x), want)
        # (how close fused and unfused stay once gates move: test_perturbed_model_outputs_...)


def test_gate_methods_of_each_type() -> None:
    assert gate_methods(SqueezeExcite(64)) == ("scale",)
    assert gate_methods(EfficientChannelAttn(64)) == ("scale",)
    assert gate_methods(Cbam(64)) == ("channel_scale", "spatial_scale")
    assert gate_methods(_HalfGate(8)) == ("scale",)
    assert gate_methods(nn.Identity()) is None
    b, s = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    assert torch.equal(gated_residual(_HalfGate(8), b, s), s + b * 0.5)
    assert torch.equal(gated_residual(nn.Identity(), b, s), b + s)


class _Block(nn.Module):
    def __init__(self, c: int, inplace: bool, layer_scale: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        if self.gamma is not None:
            y = y * self.gamma
        return torch.relu(y.add_(x) if self.inplace else y + x)


class TinyResNet(nn.Module):
    """A stem, one block whose add is in place and one whose add is not, a head."""

    def __init__(self, c: int = 16, layer_scale: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.inplace_block = _Block(c, inplace=True, layer_scale=layer_scale)
        self.block = _Block(c, inplace=False, layer_scale=layer_scale)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.inplace_block(torch.relu(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def test_inplace_add_keeps_the_module_call() -> None:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    gm = retrofit.retrofit(model, "se", input_size=16)
    assert [r.module for r in get_report(gm).rows] == ["inplace_block.se", "block.se"]
    assert [str(n.args[0].target) for n in _fused(gm)] == ["block.se"]
    assert "inplace_block.se" in _called(gm)
    assert get_report(gm).max_abs_diff == 0.0


def test_only_the_module_next_to_the_add_fuses() -> None:
    rules = parse_rules({"rule": [
        {"at": "residual-add", "attn": "se", "position": "branch"},
        {"at": "residual-add", "attn": "cbam", "position": "branch", "conflict": "stack"},
        {"at": "residual-add", "attn": "eca", "position": "mid", "conflict": "stack"},
        {"at": "residual-add", "attn": "eca", "position": "after", "conflict": "stack"},
    ]}, "chain")
    model = cached("resnet18")
    gm = retrofit.retrofit(model, rules=rules, input_size=32)
    report = get_report(gm)
    by_position = {p: [r.module for r in report.rows if r.position == p] for p in ("branch", "mid", "after")}
    fused = [str(n.args[0].target) for n in _fused(gm)]
    assert fused == [m for m in by_position["branch"] if m.endswith(".cbam")] and len(fused) == 8
    # The SE before it in the chain, and the mid and after modules, stay module calls.
    assert set(by_position["mid"] + by_position["after"]) | {m for m in by_position["branch"] if m.endswith(".se")} \
        <= _called(gm)
    assert report.max_abs_diff == 0.0
    gm.graph.lint()


def test_fuse_is_in_the_recipe_and_survives_save_and_load(tmp_path: Path) -> None:
    fused, plain = _pair("resnet18", "cbam", 32)
    assert retrofit.get_recipe(fused).options.fuse is True and retrofit.get_recipe(plain).options.fuse is False
    assert fused.meta["retrofit_recipe"] is retrofit.get_recipe(fused)  # torch.fx's meta holds it too
    # (test_saving round-trips fused models.) An unfused model loads unfused.
    loaded = retrofit.load(retrofit.save(plain, tmp_path / "plain.safetensors", model_spec="resnet18"))
    assert not _fused(loaded) and {r.module for r in get_report(loaded).rows} <= _called(loaded)
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), loaded.eval()
    assert torch.equal(plain(x), loaded(x))


def test_tracing_a_fused_model_again_keeps_its_fused_adds() -> None:
    gm = retrofit.retrofit(cached("resnet18"), "cbam", input_size=32)
    again = trace(gm)
    assert len(_fused(again)) == 8
    x = torch.randn(2, 3, 32, 32)
    gm.eval(), again.eval()
    assert torch.equal(gm(x), again(x))
