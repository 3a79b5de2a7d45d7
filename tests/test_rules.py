"""Rule files: built-ins resolve, user files load, invalid files fail with exact errors."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import retrofit
from retrofit import RuleError, get_report
from retrofit.rulefile import list_builtin_rules, load_rules, resolve_rules

from .conftest import cached


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def test_builtins_listed_with_descriptions() -> None:
    builtins = list_builtin_rules()
    assert {"se", "eca", "cbam"} <= set(builtins)
    assert all(builtins.values())


@pytest.mark.parametrize("name", ["se", "eca", "cbam"])
def test_builtin_resolves_to_residual_branch_with_conv_fallback(name: str) -> None:
    rules = resolve_rules(name).rules
    assert [(r.at, r.attn, r.position, r.fallback) for r in rules] == [
        ("residual-add", name, "branch", False),
        ("conv-block", name, "after", True),
    ]


def test_user_file_with_globs(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "se"\ninclude = ["layer3.*", "layer4.*"]\n')
    gm = retrofit.retrofit(cached("resnet50"), rules=path, input_size=64)
    report = get_report(gm)
    assert [r.path for r in report.rows] == [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)]
    assert len(report.skipped) == 7 and report.max_abs_diff == 0.0


def test_after_position_and_sigmoid_gate(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "eca"\nposition = "after"\ngate = "sigmoid"\n'
                           'exclude = ["layer1.*"]\n')
    report = get_report(retrofit.retrofit(cached("resnet18"), rules=path, input_size=64))
    assert [r.module for r in report.rows][:2] == ["layer2.0.eca_out", "layer2.1.eca_out"]
    assert {r.gate for r in report.rows} == {"sigmoid"}


def test_two_rules_on_one_site_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "se"\n[[rule]]\nat = "residual-add"\nattn = "eca"\n'
                           'include = ["layer4.*"]\n')
    with pytest.raises(RuleError, match=r"rule 2 and .*rule 1 both select site 'layer4.0.add'; narrow one rule"):
        retrofit.retrofit(cached("resnet18"), rules=path, input_size=64)


@pytest.mark.parametrize(
    "text,message",
    [
        ('[[rule]]\nat = "residual-add"\nattn = "se"\nincldue = ["x"]\n',
         r"rules.toml, rule 1: unknown key 'incldue'; did you mean 'include'\? \(valid: "),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\ngate = 1\n',
         r"rules.toml, rule 1: 'gate' must be a string, got 1"),
        ('[[rule]]\nat = "residual-add"\nattn = "cbma"\n',
         r"rules.toml, rule 1: unknown attention 'cbma'; did you mean 'cbam'\? \(valid: bam, cbam, .*eca, .*se"),
        ('[[rule]]\nat = "residual"\nattn = "se"\n',
         r"rules.toml, rule 1: unknown site kind at = 'residual' \(valid: residual-add, conv-block\)"),
        ('[[rule]]\nat = "conv-block"\nattn = "se"\nposition = "branch"\n',
         r"rules.toml, rule 1: position = 'branch' is not valid for conv-block sites \(valid: after\)"),
        ('[[rule]]\nattn = "se"\n', r"rules.toml, rule 1: missing required key 'at'"),
        ('[[rule]\nat = "x"\n', r"rules.toml: TOML syntax error: .*line 1"),
        ('title = "x"\n', r"rules.toml: unknown key 'title'"),
        ('description = "nothing"\n', r"rules.toml: no \[\[rule\]\] table"),
    ],
)
def test_invalid_rule_files(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RuleError, match=message):
        load_rules(path)


def test_unknown_builtin_suggests() -> None:
    with pytest.raises(RuleError, match=r"unknown attention rule set 'cbm'; did you mean 'cbam'\?"):
        resolve_rules("cbm")


# --- the rule language (selectors, positions, conflicts, plan, docs) -------------------

README = Path(__file__).resolve().parents[1] / "rules" / "README.md"


def readme_examples() -> list[tuple[str, int]]:
    text = README.read_text()
    blocks = text.split("```toml\n")[1:]
    out = []
    for block in blocks:
        body = block.split("```", 1)[0]
        first = body.splitlines()[0]
        assert first.startswith("# resnet50: "), first
        out.append((body, int(first.split(":")[1])))
    return out


def test_readme_has_examples() -> None:
    assert len(readme_examples()) >= 12


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs(index: int) -> None:
    body, want = readme_examples()[index]
    rules = retrofit.rulefile.parse_rules(__import__("tomllib").loads(body), f"README example {index}")
    plan = retrofit.plan(cached("resnet50"), rules=rules)
    assert len(plan.placements) == want


def test_readme_documents_every_key_with_default() -> None:
    text = README.read_text()
    from retrofit.rulefile import _RULE_KEYS

    for key in _RULE_KEYS:
        assert f"| `{key}` |" in text, key
    for name in list_builtin_rules():
        assert f"`{name}`" in text, name


def test_layer3_layer4_plan_explains_the_seven_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "se"\ninclude = ["layer3.*", "layer4.*"]\n')
    plan = retrofit.plan(cached("resnet50"), rules=path)
    assert len(plan.placements) == 9
    assert [(s.path, why) for s, why in plan.skipped] == [
        (p, f"not matched by include ['layer3.*', 'layer4.*'] ({path}, rule 1)")
        for p in ["layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2", "layer2.3"]
    ]
    assert plan.notes == ("53 conv-block sites: no rule targets conv-block sites",)
    assert "skipped" in plan.table() and "layer3.0" in plan.table()


def test_plan_reasons_for_each_filter(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "se"\nexclude = ["layer1.0"]\nmin_channels = 256\n'
                           'max_channels = 1024\nmax_size = 28\nstages = [2, 3]\nblocks = [0, 1, 2]\nevery = 2\nlast = 2\n')
    plan = retrofit.plan(cached("resnet50"), rules=path)
    reasons = {s.path: why.split(" (")[0] for s, why in plan.skipped}
    assert reasons["layer1.0"] == "excluded by ['layer1.0']"
    assert reasons["layer1.1"] == "size 56x56 > max_size = 28"
    assert reasons["layer4.0"] == "2048 channels > max_channels = 1024"
    assert reasons["layer2.3"] == "block 3 of stage 2 not in blocks = [0, 1, 2]"
    assert reasons["layer2.1"] == "every = 2 keeps sites 1, 3, ..."
    assert reasons["layer2.0"] == "last = 2 keeps the last 2"
    assert [p.site.path for p in plan.placements] == ["layer2.2", "layer3.1"]
    low = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "se"\nmin_channels = 1024\nstages = [1, -1]\n')
    reasons = {s.path: why.split(" (")[0] for s, why in retrofit.plan(cached("resnet50"), rules=low).skipped}
    assert reasons["layer1.0"] == "256 channels < min_channels = 1024"
    assert reasons["layer3.0"] == "stage 3 of 4 not in stages = [1, -1]"


def test_rejected_candidates_are_in_the_plan() -> None:
    plan = retrofit.plan(cached("convnext_tiny"), "se-mid", input_size=64)
    # ConvNeXt's branch has one conv: no middle, so `keep` puts SE before the add.
    assert len(plan.placements) == 18 and {p.position for p in plan.placements} == {"branch"}
    assert all("position 'mid' needs a branch with two or more convolutions" in why
               for _, why in plan.skipped) and plan.skipped == ()


@pytest.mark.parametrize(
    "name,model,count,position,channels",
    [
        ("se-mid", "resnet50", 16, "mid", [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3),
        ("eca-mid", "resnet50", 16, "mid", [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3),
        ("se-mid", "convnext_tiny", 18, "branch", [96] * 3 + [192] * 3 + [384] * 9 + [768] * 3),
        ("se-conv", "resnet18", 20, "after", None),
        ("eca-conv", "vgg11_bn", 8, "after", [64, 128, 256, 256, 512, 512, 512, 512]),
        ("cbam-conv", "resnet18", 20, "after", None),
        ("se-mid", "vgg11_bn", 8, "after", None),
    ],
)
def test_builtin_variants_on_real_models(name, model, count, position, channels) -> None:
    gm = retrofit.retrofit(cached(model), name, input_size=64)
    report = get_report(gm)
    assert len(report.rows) == count
    assert {r.position for r in report.rows} == {position}
    if channels is not None:
        assert [r.channels for r in report.rows] == channels
    assert report.max_abs_diff == 0.0
    gm.graph.lint()


def test_mid_position_is_cheaper_and_exact() -> None:
    full = get_report(retrofit.retrofit(cached("resnet50"), "se", input_size=64))
    mid = get_report(retrofit.retrofit(cached("resnet50"), "se-mid", input_size=64))
    assert mid.params_added < full.params_added / 10
    assert [r.module for r in mid.rows][:2] == ["layer1.0.se_mid", "layer1.1.se_mid"]


def test_conflict_stack_replace_keep(tmp_path: Path) -> None:
    base = '[[rule]]\nat = "residual-add"\nattn = "se"\n[[rule]]\nat = "residual-add"\nattn = "eca"\nstages = [-1]\n'
    for conflict, modules in [
        ("stack", ["layer4.0.se", "layer4.0.eca"]),
        ("replace", ["layer4.0.eca"]),
        ("keep", ["layer4.0.se"]),
    ]:
        path = write(tmp_path, base + f'conflict = "{conflict}"\n')
        gm = retrofit.retrofit(cached("resnet18"), rules=path, input_size=64)
        report = get_report(gm)
        assert [r.module for r in report.rows if r.path == "layer4.0"] == modules
        assert report.max_abs_diff == 0.0
        if conflict == "stack":
            # Stacked modules run in rule order: se feeds eca, eca feeds the add (fused into it).
            assert 'layer4_0_se = getattr(self.layer4, "0").se(layer4_0_bn2)' in gm.code
            assert re.search(r"retrofit_fuse_gated_residual\(layer4_0_eca\w*, layer4_0_se, ", gm.code)


def test_glob_matching_nothing_warns_then_strict_errors(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "se"\ninclude = ["layer9.*", "layer4.*"]\n')
    with pytest.warns(UserWarning, match=r"rule 1: include glob 'layer9.\*' matches no residual-add site"):
        gm = retrofit.retrofit(cached("resnet18"), rules=path, input_size=64)
    assert len(get_report(gm).rows) == 2
    assert "include glob 'layer9.*' matches no residual-add site" in get_report(gm).warnings[0]
    with pytest.raises(RuleError, match=r"include glob 'layer9.\*' matches no residual-add site \(paths look like "
                                        r"'layer1.0', 'layer4.1'\); fix the glob or drop strict"):
        retrofit.retrofit(cached("resnet18"), rules=path, input_size=64, strict=True)


def test_invalid_file_inserts_nothing(tmp_path: Path) -> None:
    model = cached("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "se"\nargs = { reduction = 4 }\n')
    with pytest.raises(RuleError, match=r"rule 1: attention 'se' takes no argument 'reduction' \(valid: rd_ratio, "):
        retrofit.retrofit(model, rules=path, input_size=64)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "text,message",
    [
        ('[[rule]]\nat = "residual-add"\nattn = "se"\nargs = { rd_rato = 0.5 }\n',
         r"rule 1: attention 'se' takes no argument 'rd_rato'; did you mean 'rd_ratio'\?"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\nargs = { channels = 8 }\n',
         r"rule 1: args.channels is set by retrofit, not by a rule"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\nevery = 0\n', r"rule 1: 'every' must be at least 1, got 0"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\nfirst = true\n', r"rule 1: 'first' must be an integer, got True"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\nstages = [0]\n',
         r"rule 1: stages are numbered from 1 \(or -1 for the last\), got 0"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\nblocks = ["a"]\n',
         r"rule 1: 'blocks' must be an array of integers, got \['a'\]"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\nconflict = "merge"\n',
         r"rule 1: conflict = 'merge' is not valid \(valid: error, keep, replace, stack\)"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\nposition = "before"\n',
         r"rule 1: position = 'before' is not valid for residual-add sites \(valid: branch, after, mid\)"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\ngate = "relu"\n',
         r"rule 1: unknown gate 'relu' \(valid: identity, sigmoid\)"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\ninclude = "layer1.*"\n',
         r"rule 1: 'include' must be an array, got 'layer1.\*'"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\ninclude = [1]\n',
         r"rule 1: 'include' must be an array of strings \(globs\), got \[1\]"),
        ('[[rule]]\nat = "residual-add"\nattn = "se"\n\n[[rule]]\nat = "residual-add"\nattn = "se"\nx = 1\n',
         r"rules.toml, rule 2: unknown key 'x'"),
        ('rule = 3\n', r"rules.toml: 'rule' must be an array of tables, written \[\[rule\]\]"),
        ('description = 3\n[[rule]]\nat = "residual-add"\nattn = "se"\n', r"rules.toml: 'description' must be a string"),
        ('[[rule]]\nat = "residual-add"\nattn = se\n', r"rules.toml: TOML syntax error: Invalid value \(at line 3, column 8\)"),
    ],
)
def test_more_invalid_rule_files(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RuleError, match=message):
        load_rules(path)


def test_conflict_error_names_both_rules_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "se"\n[[rule]]\nat = "residual-add"\nattn = "eca"\n')
    with pytest.raises(RuleError, match=r"rule 2 and .*rule 1 both select site 'layer1.0.add'; .*conflict = \"keep\""):
        retrofit.plan(cached("resnet18"), rules=path, input_size=64)


def test_registered_attention_without_rule_file_gets_default_placement() -> None:
    from torch import nn

    @retrofit.register_attention("test_plain_gate")
    class PlainGate(nn.Module):
        def __init__(self, channels: int, gate: str = "identity", device=None, dtype=None) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (1 + self.w.view(1, -1, 1, 1))

    try:
        rules = resolve_rules("test_plain_gate")
        assert [(r.at, r.attn, r.position, r.fallback) for r in rules.rules] == [
            ("residual-add", "test_plain_gate", "branch", False),
            ("conv-block", "test_plain_gate", "after", True),
        ]
        report = get_report(retrofit.retrofit(cached("resnet18"), "test_plain_gate", input_size=64))
        assert len(report.rows) == 8 and report.max_abs_diff == 0.0
    finally:
        retrofit.attention.unregister_attention("test_plain_gate")


def test_an_input_too_small_to_tell_stages_apart_is_said(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "se"\nstages = [-2, -1]\n')
    with pytest.warns(UserWarning, match=r"6 residual-add sites of 3 widths \(128, 256, 512 channels\) all see 1x1 "
                                         r"maps at this input size, so they count as one stage: .*rule 1 selects by "
                                         r"stages/blocks.*use a larger input_size"):
        small = retrofit.plan(cached("resnet18"), rules=path, input_size=8)
    assert len(small.placements) == 8 and small.warnings  # stages -2 and -1 are now 2x2 and "1x1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        usual = retrofit.plan(cached("resnet18"), rules=path, input_size=64)
    assert [p.site.path for p in usual.placements] == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]


def test_a_site_the_attention_cannot_take_is_skipped_with_its_reason() -> None:
    from torch import nn

    @retrofit.register_attention("test_wide_gate")
    class WideGate(nn.Module):
        def __init__(self, channels: int, min_width: int = 128, gate: str = "identity", device=None,
                     dtype=None) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))

        @classmethod
        def site_problem(cls, channels: int, size: tuple[int, int], min_width: int = 128, **_: object) -> str | None:
            return f"{channels} channels < {min_width}" if channels < min_width else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (1 + self.w.view(1, -1, 1, 1))

    try:
        plan = retrofit.plan(cached("resnet18"), "test_wide_gate", input_size=64)
        assert [p.site.path for p in plan.placements] == ["layer2.0", "layer2.1", "layer3.0", "layer3.1",
                                                           "layer4.0", "layer4.1"]
        assert [(s.path, why.split(" (")[0]) for s, why in plan.skipped] == [
            ("layer1.0", "test_wide_gate: 64 channels < 128"), ("layer1.1", "test_wide_gate: 64 channels < 128")]
        report = get_report(retrofit.retrofit(cached("resnet18"), "test_wide_gate", input_size=64))
        assert len(report.rows) == 6 and report.max_abs_diff == 0.0
    finally:
        retrofit.attention.unregister_attention("test_wide_gate")


def test_attention_name_in_a_rule_file_ignores_case(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rule]]\nat = "residual-add"\nattn = "SE"\ninclude = ["layer4.*"]\n')
    report = get_report(retrofit.retrofit(cached("resnet18"), rules=path, input_size=64))
    assert [r.module for r in report.rows] == ["layer4.0.se", "layer4.1.se"]
    assert report.max_abs_diff == 0.0
