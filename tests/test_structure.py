"""The model's structure survives: with keep_class=True each block is rewritten in place and
keeps its class, its place in containers and its hooks; the GraphModule form keeps its
containers indexable and says what it is when asked for a method it lacks."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import retrofit
from retrofit.rewrite import rewritten_in_place

from .conftest import cached

CASES = [
    ("resnet18", "se", lambda m: m.layer4[-1]),
    ("resnet50", "cbam", lambda m: m.layer4[-1]),
    ("efficientnet_b0", "eca", lambda m: m.blocks[-2][-1]),
    ("tv:resnet50", "se", lambda m: m.layer4[-1]),
]


def _perturbed(model: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.mark.parametrize("name,attn,last_block", CASES, ids=[c[0] for c in CASES])
def test_keep_class_keeps_blocks_in_place(name: str, attn: str, last_block) -> None:
    model = cached(name)
    kept = retrofit.retrofit(model, attn, input_size=64, keep_class=True)
    whole = retrofit.retrofit(model, attn, input_size=64)
    report = retrofit.get_report(kept)
    assert type(kept) is type(model) and report.max_abs_diff == 0.0 and report.rows
    # Every rewritten unit is the module of the model's own tree, with its own class
    # (a subclass of the same name, whose forward is the rewritten graph's).
    for path in report.traced:
        orig = model.get_submodule(path)
        unit = kept.get_submodule(path)
        assert isinstance(unit, type(orig)) and type(unit).__name__ == type(orig).__name__
        assert rewritten_in_place(unit)
    for r in report.rows:  # every module sits in a block, not in the model's own forward
        assert any(r.module.startswith(f"{p}.") for p in report.traced), r.module
    # Containers index as before, and hooks on blocks fire.
    block = last_block(kept)
    assert isinstance(block, type(last_block(model))) and rewritten_in_place(block)
    fired: list[tuple[int, ...]] = []
    handle = block.register_forward_hook(lambda _m, _i, out: fired.append(tuple(out.shape)))
    x = torch.randn(2, 3, 64, 64)
    kept.eval(), whole.eval()
    with torch.no_grad():
        assert torch.equal(kept(x), whole(x))
    assert len(fired) == 1
    handle.remove()
    # State dicts move between the two forms.
    assert kept.state_dict().keys() == whole.state_dict().keys()
    _perturbed(whole)
    kept.load_state_dict(whole.state_dict())
    with torch.no_grad():
        assert torch.equal(kept(x), whole(x))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_keep_class_keeps_every_method(name: str) -> None:
    kept = retrofit.retrofit(cached(name), "eca", input_size=64, keep_class=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = kept.eval().forward_features(x)
        assert torch.equal(kept.forward_head(feats), kept(x))
    kept.reset_classifier(7)
    assert kept.get_classifier().out_features == 7 and kept(x).shape == (1, 7)


def test_in_place_blocks_survive_deepcopy_and_pickling() -> None:
    kept = _perturbed(retrofit.retrofit(cached("resnet18"), "cbam", input_size=64, keep_class=True)).eval()
    buf = io.BytesIO()
    torch.save(kept, buf)
    buf.seek(0)
    x = torch.randn(2, 3, 64, 64)
    for other in (copy.deepcopy(kept), torch.load(buf, weights_only=False)):
        assert isinstance(other.layer2[0], type(cached("resnet18").layer2[0])) and rewritten_in_place(other.layer2[0])
        assert other.layer2[0].cbam is not kept.layer2[0].cbam  # a copy, not a view
        with torch.no_grad():
            assert torch.equal(other.eval()(x), kept(x))


def test_a_kept_class_model_can_be_retrofitted_again() -> None:
    kept = retrofit.retrofit(cached("resnet18"), "se", input_size=64, keep_class=True)
    again = retrofit.retrofit(kept, "eca", input_size=64, keep_class=True, on_existing="stack")
    report = retrofit.get_report(again)
    assert report.max_abs_diff == 0.0 and [r.module for r in report.rows][:2] == ["layer1.0.eca", "layer1.1.eca"]
    block = again.layer1[0]
    assert type(block).__mro__[1] is type(cached("resnet18").layer1[0])  # one subclass, not a chain
    assert isinstance(block.se, retrofit.attention.SqueezeExcite) and isinstance(block.eca, nn.Module)


def test_graph_module_keeps_containers_and_names_itself() -> None:
    gm = retrofit.retrofit(cached("resnet18"), "se", input_size=64)
    assert isinstance(gm, torch.fx.GraphModule)
    assert isinstance(gm.layer4, nn.Sequential) and gm.layer4[-1] is gm.layer4[1] and len(gm.layer4) == 2
    assert [type(m).__name__ for m in gm.layer4] == ["Module", "Module"]  # blocks are the graph's containers
    with pytest.raises(AttributeError, match=r"'ResNet' object has no attribute 'get_classifier': it is the "
                                             r"torch.fx.GraphModule made by tracing timm.models.resnet.ResNet.*"
                                             r"keep_class=True\) \(CLI: --keep-class\) keeps the model's class"):
        gm.get_classifier()
    with pytest.raises(AttributeError, match=r"'ResNet' object has no attribute 'no_such_thing'$"):
        gm.no_such_thing  # noqa: B018  (not a method of ResNet: the plain message)
    gm2 = copy.deepcopy(gm)
    with pytest.raises(AttributeError, match="keep_class=True"):
        gm2.forward_features  # noqa: B018


def test_analyze_reports_what_was_left_alone() -> None:
    analysis = retrofit.analyze(cached("resnet18"), 64, keep_class=True)
    assert analysis.left_alone == (("", "the forward of ResNet stays Python code (keep_class)"),)
    assert retrofit.analyze(cached("resnet18"), 64).left_alone == ()
