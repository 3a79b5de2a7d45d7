"""Partial tracing: models that do not trace as a whole, and results that keep the model's class."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import timm
import torch
from timm.models.resnet import BasicBlock
from torch import nn

import retrofit
from retrofit import SiteError, TraceError
from retrofit.fuse import gated_residual
from retrofit.partition import _MAX_RETRACES, Partition, partition
from retrofit.probe import record_inputs
from retrofit.rewrite import rewritten_in_place
from retrofit.rulefile import parse_rules
from retrofit.sites import SiteRef
from retrofit.trace import trace

from .conftest import build, cached, run_cli


class NanGuard(nn.Module):
    """Skips its block on non-finite input: value-dependent control flow torch.fx cannot follow."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(x).all():
            return x
        return self.block(x)


def guarded_resnet18() -> nn.Module:
    model = build("resnet18")
    model.layer3[1] = NanGuard(model.layer3[1])
    return model


class Wrapper(nn.Module):
    """A top-level forward that branches on values, around a whole timm model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build("resnet18")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().max() > 1e6:  # refuse absurd inputs
            raise ValueError("input out of range")
        return self.net(x)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def test_untraceable_block_is_retrofitted_around() -> None:
    model = guarded_resnet18().eval()
    with pytest.raises(TraceError):
        trace(model)
    before, structure = _state(model), repr(model)
    with pytest.warns(UserWarning, match=r"ResNet does not trace as a whole; attention went into 8 traced"):
        out = retrofit.retrofit(model, "se", input_size=64)
    assert _same(model, before) and repr(model) == structure  # the input is untouched
    assert type(out) is type(model)
    report = retrofit.get_report(out)
    # Every site of resnet18, the one inside the guard included (its block traces alone).
    assert [r.module for r in report.rows] == [
        "layer1.0.se", "layer1.1.se", "layer2.0.se", "layer2.1.se",
        "layer3.0.se", "layer3.1.block.se", "layer4.0.se", "layer4.1.se",
    ]
    # Each block is rewritten in place, the one inside the guard too.
    assert report.traced == ("layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1.block",
                             "layer4.0", "layer4.1")
    # layer3 traces with its child 1 (the guard, whose forward does not trace) called whole;
    # the guard's own block then traces alone.
    assert [p for p, _ in report.left_alone] == ["", "layer3.1"]
    assert "module 'layer3.1' (NanGuard)" in report.left_alone[0][1]
    assert "cannot trace NanGuard" in report.left_alone[1][1]
    assert report.max_abs_diff == 0.0
    assert type(out.layer1) is nn.Sequential and isinstance(out.layer3[1], NanGuard)
    assert isinstance(out.layer3[1].block, BasicBlock) and rewritten_in_place(out.layer3[1].block)
    # Same module names and parameter count as a whole-model rewrite of plain resnet18.
    whole = retrofit.get_report(retrofit.retrofit(cached("resnet18"), "se", input_size=64, verify=False))
    assert report.params_added == whole.params_added
    assert [r.path for r in report.rows] == [
        r.path.replace("layer3.1", "layer3.1.block") for r in whole.rows
    ]
    # Stages are numbered over the whole model, not per traced piece.
    adds = retrofit.analyze(model, 64).of_kind("residual-add")
    assert [(s.path, s.stage, s.block) for s in adds][4:6] == [("layer3.0", 3, 0), ("layer3.1.block", 3, 1)]


def test_partial_result_trains_and_runs_the_guard() -> None:
    out = retrofit.retrofit(guarded_resnet18(), "cbam", input_size=64, gate="sigmoid")
    out.train()
    x = torch.randn(2, 3, 64, 64)
    out(x).logsumexp(1).mean().backward()
    new = [p for n, p in out.named_parameters() if ".cbam." in n]
    assert new and all(p.grad is not None for p in new)
    # The guard is still Python: a non-finite input skips its block, as before the rewrite.
    out.eval()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isnan(out(bad)).any()


def test_untraceable_top_level_keeps_the_wrapper() -> None:
    model = Wrapper().eval()
    with pytest.warns(UserWarning, match="Wrapper does not trace as a whole"):
        out = retrofit.retrofit(model, "eca", input_size=64)
    report = retrofit.get_report(out)
    assert type(out) is Wrapper and type(out.net) is type(model.net) and isinstance(out.net.layer4[1], BasicBlock)
    assert len(report.traced) == 8 and len(report.rows) == 8 and report.max_abs_diff == 0.0
    assert report.left_alone[0][0] == "" and "the top-level forward of Wrapper" in report.left_alone[0][1]
    with pytest.raises(ValueError, match="input out of range"):
        out(torch.full((1, 3, 64, 64), 1e7))


def test_nothing_traceable_raises_the_whole_model_error() -> None:
    class Hopeless(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y if y.mean() > 0 else -y

    with pytest.raises(TraceError, match=r"cannot trace Hopeless: the top-level forward of Hopeless") as info:
        retrofit.retrofit(Hopeless(), "se", input_size=16)
    # Not "make it a leaf module": following that advice gave the same error.
    assert "leaf_modules=" not in str(info.value) and "--leaf-module" not in str(info.value)
    assert "a site written in Hopeless.forward itself is reachable only if that code moves into a submodule" \
        in str(info.value)
    assert info.value.code == "return y if y.mean() > 0 else -y" and info.value.module == ""


def test_untraceable_model_without_convolutions_has_no_sites() -> None:
    # Like timm's Gemma4 ViT: a Linear patch embedding and a shape check torch.fx cannot
    # follow. No trace could find a site in it, so the answer is "no sites", not the trace error.
    class LinearPatches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(48, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.ndim != 4:
                raise ValueError("images only")
            return self.embed(x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).flatten(3))

    model = LinearPatches()
    assert retrofit.analyze(model, input_size=16).sites == ()
    with pytest.raises(SiteError, match=r"LinearPatches has no residual adds and no conv blocks .* it also does "
                                        r"not trace as a whole \(cannot trace LinearPatches: the top-level forward"
                                        r".*\), but it holds no convolution"):
        retrofit.retrofit(model, "se", input_size=16)


@pytest.mark.parametrize("attn", ["se", "cbam"])
def test_keep_class_matches_the_whole_model_rewrite(attn: str) -> None:
    model = cached("resnet50")
    kept = retrofit.retrofit(model, attn, input_size=64, keep_class=True)
    whole = retrofit.retrofit(model, attn, input_size=64)
    assert type(kept) is type(model) and type(kept.layer2) is nn.Sequential
    report = retrofit.get_report(kept)
    assert report.traced == tuple(f"layer{i}.{j}" for i, n in ((1, 3), (2, 4), (3, 6), (4, 3)) for j in range(n))
    assert len(report.rows) == 16 and report.max_abs_diff == 0.0
    assert not [w for w in report.warnings if "out of reach" in w] and report.out_of_reach == ()
    # Same names, so checkpoints move between the two forms.
    assert kept.state_dict().keys() == whole.state_dict().keys()
    assert [r.module for r in report.rows] == [r.module for r in retrofit.get_report(whole).rows]
    x = torch.randn(2, 3, 64, 64)
    kept.eval(), whole.eval()
    with torch.no_grad():
        assert torch.equal(kept(x), whole(x))
        assert torch.equal(kept.forward_features(x), model.eval().forward_features(x))


def test_keep_class_stacks_two_modules_on_one_site(tmp_path: Path) -> None:
    # Two placements name one site, which the in-place pass hands from the module that
    # holds its convolution (nf_resnet26's stem.conv, a weight-standardised conv) up to
    # the one that also holds the activation after it (stem): once, not once per placement.
    rules = tmp_path / "stack.toml"
    rules.write_text('[[rule]]\nat = "conv-block"\nattn = "se"\n'
                     '[[rule]]\nat = "conv-block"\nattn = "eca"\nconflict = "stack"\n')
    model = cached("nf_resnet26")
    kept = retrofit.retrofit(model, rules=rules, input_size=32, keep_class=True)
    whole = retrofit.retrofit(model, rules=rules, input_size=32)
    report = retrofit.get_report(kept)
    assert type(kept) is type(model) and report.traced == ("stem",)
    assert [(r.path, r.attn) for r in report.rows] == [("stem.conv.conv2d", "se"), ("stem.conv.conv2d", "eca")]
    assert report.out_of_reach == () and report.max_abs_diff == 0.0
    assert kept.state_dict().keys() == whole.state_dict().keys()


def test_keep_class_methods_work() -> None:
    kept = retrofit.retrofit(cached("resnet18"), "se", input_size=64, keep_class=True)
    kept.reset_classifier(7)
    assert kept.get_classifier().out_features == 7
    assert kept.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    # timm's own helpers read the config the model keeps.
    assert timm.data.resolve_data_config(model=kept)["input_size"] == (3, 224, 224)


def test_keep_class_reports_sites_in_the_top_level_forward() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            return x + self.body(x)  # a residual add in the forward that keep_class keeps

    whole = retrofit.get_report(retrofit.retrofit(Outer(), "se", input_size=16))
    assert [r.path for r in whole.rows] == [""]
    with pytest.warns(UserWarning, match="selected no site"):
        kept = retrofit.retrofit(Outer(), "se", input_size=16, keep_class=True)
    report = retrofit.get_report(kept)
    # The fallback is decided on every site of the model: it has a residual add, out of
    # reach, so the rules do not switch to its conv blocks; the report says so.
    assert report.rows == ()
    assert ("keep_class: 1 site(s) the rules select are in forward code kept as Python, out of reach: (top level)"
            in report.warnings)
    assert any("fallback) not used: the model has residual-add sites, but none is within reach ((top level) are "
               "in forward code kept as Python)" in w for w in report.warnings), report.warnings
    assert report.out_of_reach == ("(top level)",) and report.to_dict()["out_of_reach"] == ["(top level)"]
    assert report.max_abs_diff == 0.0


class TwoBranches(nn.Module):
    """HRNet's multi-resolution module in small: its forward assigns list items, which
    torch.fx cannot trace, around branch blocks that trace alone, and adds the branches."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8)) for _ in range(2)])

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        for i, branch in enumerate(self.branches):
            x[i] = branch(x[i])
        return [x[0] + x[1]]


class MultiResolution(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = TwoBranches()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.stage([x, x * 2])[0]
        return self.head(y.mean((2, 3)))


def test_keep_class_reaches_blocks_below_a_module_that_does_not_trace() -> None:
    """The branch blocks are reached alone although the module around them does not trace
    and holds a site of its own (which stays out of reach)."""
    model = MultiResolution().eval()
    whole = retrofit.get_report(retrofit.retrofit(model, "se", input_size=16))
    blocks = [f"stage.branches.{i}.{j}" for i in range(2) for j in range(2)]
    assert [r.path for r in whole.rows] == [*blocks, "stage"]
    kept = retrofit.retrofit(model, "se", input_size=16, keep_class=True)
    report = retrofit.get_report(kept)
    assert [r.path for r in report.rows] == blocks and report.traced == tuple(blocks)
    assert report.out_of_reach == ("stage",)
    assert type(kept.stage) is TwoBranches and isinstance(kept.stage.branches[1][0], BasicBlock)
    assert rewritten_in_place(kept.stage.branches[1][0]) and not rewritten_in_place(kept.stage)
    assert report.max_abs_diff == 0.0
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(kept.eval()(x), model(x))


def test_keep_class_round_trips(tmp_path: Path) -> None:
    kept = retrofit.retrofit(build("resnet18"), "se", input_size=64, gate="sigmoid", keep_class=True)
    with torch.no_grad():
        for p in kept.parameters():
            p.add_(0.01)
    path = retrofit.save(kept, tmp_path / "m.safetensors")
    loaded = retrofit.load(path)
    assert type(loaded) is type(kept)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(kept.eval()(x), loaded.eval()(x))


class PosConv(nn.Module):
    """Twins' position encoding: tokens back to a map of the ``size`` passed in, a depthwise
    conv and a residual add, tokens again."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        y = x.transpose(1, 2).view(b, c, *size)  # a single proxy for `size` cannot be unpacked
        return (self.proj(y) + y).flatten(2).transpose(1, 2)


class RowScale(nn.Module):
    """Reads its size input by index, which traces with ``size`` as one input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], size[0], size[1])
        return (self.conv(y) + y).flatten(2).transpose(1, 2)


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.pos = PosConv(8)
        self.rows = RowScale(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        size = tuple(x.shape[2:])
        x = self.pos(x.flatten(2).transpose(1, 2), size)
        return self.head(self.rows(x, size).mean(1))


def test_keep_class_reaches_a_block_that_takes_its_size_as_a_tuple() -> None:
    """Twins' PosConv unpacks a ``size`` tuple input: traced with one placeholder per int,
    it holds its site at every input size, and copies keep the generated forward."""
    model = TokenNet().eval()
    with pytest.warns(UserWarning, match="TokenNet does not trace as a whole"):
        kept = retrofit.retrofit(model, "se", input_size=32, keep_class=True, gate="sigmoid")
    report = retrofit.get_report(kept)
    assert [r.module for r in report.rows] == ["pos.se", "rows.se"] and report.out_of_reach == ()
    assert type(kept) is TokenNet and type(kept.pos).__mro__[1] is PosConv
    assert len([n for n in type(kept.pos)._retrofit_graph.nodes if n.op == "placeholder"]) == 3  # x, size[0], size[1]
    # A block that traced with `size` whole keeps that graph (no flattening of its inputs).
    assert [n.target for n in type(kept.rows)._retrofit_graph.nodes if n.op == "placeholder"] == ["x", "size"]
    with torch.no_grad():
        for p in kept.parameters():
            p.add_(0.01)
    for size in (32, 48):  # the graph is not specialized to the probe's 8x8 tokens
        x = torch.randn(2, 3, size, size)
        want = kept(x)
        model_x = model.pos(model.embed(x).flatten(2).transpose(1, 2), (size // 4, size // 4))
        assert not torch.equal(kept.pos(model.embed(x).flatten(2).transpose(1, 2), (size // 4, size // 4)), model_x)
        assert torch.equal(copy.deepcopy(kept)(x), want)
    kept.train()(x).sum().backward()
    assert all(p.grad is not None for p in kept.pos.se.parameters())


def test_recorded_inputs_and_units_of_a_multi_input_block() -> None:
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor, skip: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return self.conv(x) * scale + skip

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.mix = Mixer()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            if y.std() > 0:
                y = y * 1.0
            return self.mix(y, skip=y)

    net = Net()
    calls = record_inputs(net, (3, 9, 7))
    (args, kwargs), = calls["mix"]
    assert args[0].shape == (2, 4, 9, 7) and kwargs["skip"].shape == (2, 4, 9, 7)
    parts = partition(net, (3, 9, 7))
    assert list(parts.units) == ["mix"]
    (site,) = parts.analysis.sites
    # x and skip arrive as separate inputs: inside the unit the add has no common
    # ancestor, so it is not a residual site; the conv is a conv block.
    assert (site.kind, site.path, site.channels, site.size) == ("conv-block", "mix.conv", 4, (9, 7))
    out = retrofit.retrofit(net, "se", input_size=(3, 9, 7))
    assert retrofit.get_report(out).max_abs_diff == 0.0 and [r.module for r in retrofit.get_report(out).rows] == [
        "mix.conv_se"]


class _Twin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class _Twins(nn.Module):
    """Two blocks whose graphs name their nodes alike (``conv``, ``add``), joined by a
    forward that branches on a value."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.a = _Twin()
        self.b = _Twin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(self.stem(x))
        if y.sum() > 0:
            y = y * 1.0
        return self.b(y)


def test_sites_are_named_by_unit_and_node_across_passes() -> None:
    net = _Twins()
    parts = partition(net, (3, 8, 8))
    assert list(parts.units) == ["a", "b"] and not parts.is_whole
    assert [(s.kind, s.path, s.ref, s.stage, s.block) for s in parts.analysis.sites] == [
        ("conv-block", "a.conv", SiteRef("a", "conv"), 1, 0),
        ("residual-add", "a", SiteRef("a", "add"), 1, 0),
        ("conv-block", "b.conv", SiteRef("b", "conv"), 1, 1),
        ("residual-add", "b", SiteRef("b", "add"), 1, 1),
    ]
    # Each unit's own site: paths relative to the unit, the unit named by its module path.
    assert {ref: (s.unit, s.path) for ref, s in parts.origin.items()} == {
        SiteRef("a", "conv"): ("a", "conv"), SiteRef("a", "add"): ("a", ""),
        SiteRef("b", "conv"): ("b", "conv"), SiteRef("b", "add"): ("b", ""),
    }
    unit, local = parts.local(parts.analysis.sites[3])
    assert unit is parts.units["b"] and (local.path, local.stage, local.block) == ("", 1, 1)
    # The probe could not branch on a fake tensor's value: it ran on zeros, and says why.
    assert parts.probe_fallback is not None and parts.probe_fallback.startswith("DataDependentOutputException")
    out = retrofit.retrofit(net, "se", input_size=(3, 8, 8))
    report = retrofit.get_report(out)
    assert [r.module for r in report.rows] == ["a.se", "b.se"] and report.max_abs_diff == 0.0


def test_partition_is_built_by_keyword() -> None:
    parts = partition(_Twin(), (4, 8, 8), keep_class=True)
    assert parts.probe_fallback is None  # the probe ran on fake tensors
    assert list(parts.units) == [""] and parts.left_alone == (("", "the forward of _Twin stays Python code "
                                                                   "(keep_class)"),)
    # Records built by keyword only: no field can be passed by position.
    assert {p.kind for p in inspect.signature(Partition).parameters.values()} == {inspect.Parameter.KEYWORD_ONLY}


class _Skip(nn.Module):
    """A conv skipped on positive input: its forward does not trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else self.conv(x)


class _Skips(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.skips = nn.ModuleList(_Skip() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.skips:
            x = s(x)
        return x


def test_retraces_of_a_unit_are_capped() -> None:
    """Each trace of a unit calls one more submodule whole that does not trace; after the
    cap the unit is left alone with why, and its children are tried."""
    parts = partition(nn.Sequential(_Skips(_MAX_RETRACES)), (4, 8, 8))
    assert not parts.units
    why = dict(parts.left_alone)["0"]
    assert why.startswith(f"_Skips at '0' does not trace in {_MAX_RETRACES} tries, each calling whole one more "
                          "submodule that does not trace (skips.0, skips.1, skips.2, ...)")
    assert dict(parts.left_alone)["0.skips.0"].startswith("cannot trace _Skip: the top-level forward of _Skip")


def test_cli_keep_class(tmp_path: Path) -> None:
    proc = run_cli("resnet18", "--attn", "se", "--input-size", "64", "--keep-class", "--no-fuse", "--out",
                   str(tmp_path / "m.safetensors"))
    assert proc.returncode == 0, proc.stderr
    assert "rewritten in place: layer1.0, layer1.1, layer2.0, layer2.1, layer3.0, layer3.1, layer4.0, layer4.1" \
        in proc.stdout
    assert "left alone: (top level): the forward of ResNet stays Python code (keep_class)" in proc.stdout
    loaded = retrofit.load(tmp_path / "m.safetensors")
    assert type(loaded).__name__ == "ResNet" and rewritten_in_place(loaded.layer1[0])
    assert not any(n.target is gated_residual for n in type(loaded.layer1[0])._retrofit_graph.nodes)  # --no-fuse


class LoopedBlocks(nn.Module):
    """Blocks kept in containers the forward iterates in Python (as YOLO's and ConvNeXt's
    stages are), under a top-level forward that branches on values."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.ModuleList([nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16)) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            for block in stage:  # the Sequential is iterated, never called
                x = block(x)
            if x.abs().max() > 1e6:
                raise ValueError("diverged")
        return x.mean((2, 3))


def test_blocks_in_iterated_containers_are_reached() -> None:
    model = LoopedBlocks().eval()
    blocks = [f"stages.{i}.{j}" for i in range(2) for j in range(2)]
    for keep_class in (False, True):
        out = retrofit.retrofit(model, "se", input_size=16, keep_class=keep_class)
        report = retrofit.get_report(out)
        assert [r.path for r in report.rows] == blocks and report.traced == tuple(blocks)
        assert report.max_abs_diff == 0.0 and type(out) is LoopedBlocks


def test_modules_without_a_site_stay_called_submodules() -> None:
    """Attention only in layer4: every other block stays the module it was (its class, its
    forward, its hooks), in both forms; what is traced into is listed with the reason."""
    rules = parse_rules({"rule": [{"at": "residual-add", "attn": "se", "include": ["layer4.*"]}]})
    model = build("resnet18").eval()
    gm = retrofit.retrofit(model, rules=rules, input_size=64)
    report = retrofit.get_report(gm)
    assert isinstance(gm, torch.fx.GraphModule) and [r.path for r in report.rows] == ["layer4.0", "layer4.1"]
    assert report.inlined == (("layer4.0", "holds an insertion point"), ("layer4.1", "holds an insertion point"))
    calls = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert {"layer1", "layer2", "layer3", "layer4.0.downsample"} <= calls  # called whole, not traced into
    assert type(gm.layer1[0]) is BasicBlock and type(gm.layer4[0]) is not BasicBlock
    fired: list[int] = []
    gm.layer2[1].register_forward_hook(lambda *_: fired.append(1))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert fired == [1]
    # Retrofitting the result again still sees every site (the calls are traced into again).
    assert len(retrofit.analyze(gm, 64).of_kind("residual-add")) == 8


class TopLevelAdd(nn.Module):
    """Its only residual add is written in its own forward; its conv blocks are submodules."""

    def __init__(self, branch_on_values: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.branch_on_values = branch_on_values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.branch_on_values and x.abs().max() > 1e6:
            raise ValueError("diverged")
        return x + self.body(x)


def test_a_fallback_past_untraced_code_says_what_it_could_not_see() -> None:
    # (With keep_class, an add that exists but is out of reach keeps the fallback off:
    # test_keep_class_reports_sites_in_the_top_level_forward.) Not traced at all: the
    # conv-block fallback applies, and says what it could not see.
    with pytest.warns(UserWarning, match=r"falls back to conv-block sites: no residual-add site was reached, and 1 "
                                         r"part\(s\) of the model were not traced and may hold some: \(top level\)"):
        out = retrofit.retrofit(TopLevelAdd(), "se", input_size=16)
    assert [r.kind for r in retrofit.get_report(out).rows] == ["conv-block"] * 2


class _OwnFuse(nn.Module):
    """A user's block with a method named like Ultralytics' forward_fuse, meaning something else."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)) + x)

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_folded_forward_is_given_only_to_the_library_that_swaps_it_in() -> None:
    # Ultralytics' adapter names forward_fuse (its fuse() sets it as forward; tested in
    # test_ultralytics); a user's method of that name is the user's own and stays.
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _OwnFuse())
    kept = retrofit.retrofit(model, "se", input_size=(3, 8, 8), keep_class=True)
    assert [r.path for r in retrofit.get_report(kept).rows] == ["1"] and type(kept[1]) is not _OwnFuse
    assert type(kept[1]).forward_fuse is _OwnFuse.forward_fuse
