"""Rule files: built-ins resolve, user files load, invalid files fail with exact errors."""

from __future__ import annotations

from pathlib import Path

import pytest

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
        ('[[rule]]\nat = "residual-add"\nattn = "sse"\n',
         r"rules.toml, rule 1: unknown attention 'sse'; did you mean 'se'\? \(valid: cbam, eca, se"),
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
