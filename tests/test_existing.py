"""Models that already carry attention: detected, skipped by default, stacked on request."""

from __future__ import annotations

import pytest
import torch

import retrofit
from retrofit import OptionError, RuleError, get_report

from .conftest import build, cached


@pytest.mark.parametrize("name,existing", [
    ("seresnet50", "a gate at 'layer1.0.se'"),
    ("ecaresnet50d", "a gate at 'layer1.0.se'"),
])
def test_existing_attention_is_skipped_and_explained(name: str, existing: str) -> None:
    plan = retrofit.plan(cached(name), "se", input_size=64)
    assert plan.placements == ()
    reasons = [why for s, why in plan.skipped if s.kind == "residual-add"]
    assert len(reasons) == 16
    assert reasons[0] == (f"already has attention here ({existing}); on_existing = \"stack\" adds another "
                          "(built-in 'se', rule 1)")
    # The conv-block fallback stays off: the model has residual adds.
    assert any("fallback) not used: the model has residual-add sites" in n for n in plan.notes)


def test_stacking_on_existing_attention_on_request() -> None:
    gm = retrofit.retrofit(cached("seresnet50"), "eca", input_size=64, on_existing="stack")
    report = get_report(gm)
    assert len(report.rows) == 16 and report.max_abs_diff == 0.0
    assert report.rows[0].module == "layer1.0.eca"


def test_existing_is_per_position() -> None:
    """EfficientNet's SE sits before its last conv: `mid` is taken, the branch end is free."""
    analysis = retrofit.analyze(cached("efficientnet_b0"), input_size=64)
    sites = analysis.of_kind("residual-add")
    assert all(s.existing is None and s.existing_mid == f"a gate at '{s.path}.se'" for s in sites)
    report = get_report(retrofit.retrofit(cached("efficientnet_b0"), "se-mid", input_size=64))
    assert len(report.rows) == 9 and {r.position for r in report.rows} == {"branch"}  # `keep` fell back


def test_retrofitting_twice_does_not_stack_by_default() -> None:
    once = retrofit.retrofit(build("resnet18"), "se", input_size=64)
    plan = retrofit.plan(once, "se", input_size=64)
    assert plan.placements == ()
    assert plan.skipped[0][1].startswith("already has attention here (SqueezeExcite at 'layer1.0.se')")
    twice = retrofit.retrofit(once, "eca", input_size=64, on_existing="stack")
    assert [r.module for r in get_report(twice).rows][:1] == ["layer1.0.eca"]
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(twice.eval()(x), once.eval()(x))


def test_rule_key_and_bad_values(tmp_path) -> None:
    path = tmp_path / "r.toml"
    path.write_text('[[rule]]\nat = "residual-add"\nattn = "eca"\non_existing = "stack"\n')
    assert len(get_report(retrofit.retrofit(cached("seresnet50"), rules=path, input_size=64)).rows) == 16
    path.write_text('[[rule]]\nat = "residual-add"\nattn = "eca"\non_existing = "merge"\n')
    with pytest.raises(RuleError, match=r"rule 1: on_existing = 'merge' is not valid \(valid: skip, stack\)"):
        retrofit.rulefile.load_rules(path)
    with pytest.raises(OptionError, match=r"on_existing='always' is not valid \(valid: skip, stack\)"):
        retrofit.retrofit(cached("resnet18"), on_existing="always")
    with pytest.raises(OptionError, match=r"gate='relu' is not valid \(valid: identity, sigmoid\)"):
        retrofit.retrofit(cached("resnet18"), gate="relu")


def test_stacking_order_is_the_same_on_fused_and_unfused_sites() -> None:
    """The new module runs after the existing one, whether that one was fused or not."""
    torch.manual_seed(0)
    model = build("resnet18")
    fused = retrofit.retrofit(model, "se", input_size=64, gate="sigmoid")
    unfused = retrofit.retrofit(model, "se", input_size=64, gate="sigmoid", fuse=False)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if ".se." in name:
                p.normal_(0.0, 0.5)
        unfused.load_state_dict(fused.state_dict())
    a = retrofit.retrofit(fused, "eca", input_size=64, gate="sigmoid", on_existing="stack")
    b = retrofit.retrofit(unfused, "eca", input_size=64, gate="sigmoid", on_existing="stack", fuse=False)
    calls = [str(n.target) for n in a.graph.nodes if n.op == "call_module" and str(n.target).startswith("layer1.0.")]
    assert calls[-2:] == ["layer1.0.se", "layer1.0.act2"]  # SE called as a module again; then the block's ReLU
    eca = next(n for n in a.graph.nodes if n.op == "get_attr" and n.target == "layer1.0.eca")
    assert next(iter(eca.users)).args[1].target == "layer1.0.se"  # ECA (fused into the add) gates SE's output
    with torch.no_grad():
        for name, p in a.named_parameters():
            if ".eca." in name:
                p.normal_(0.0, 0.5)
        b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))
