"""The options of a rewrite as one record: built from ``options=`` and keyword overrides,
compared with ``==``, written into a recipe and read back with every field checked."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import retrofit
from retrofit.api import NothingSelectedWarning, plan
from retrofit.cli import main as cli_main
from retrofit.errors import ModelLoadError, OptionError
from retrofit.options import RetrofitOptions
from retrofit.recipe import Recipe
from retrofit.rulefile import parse_rules


class _Net(nn.Module):
    """Two residual blocks: sites for every rule set, traced in a blink."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for conv in self.convs:
            x = x + conv(x)
        return x


def test_options_and_keyword_overrides_build_one_record() -> None:
    base = RetrofitOptions(gate="sigmoid", fuse=False)
    assert RetrofitOptions.of(base, attn_args={"rd_ratio": 0.5}) == RetrofitOptions(
        gate="sigmoid", fuse=False, attn_args={"rd_ratio": 0.5})
    assert RetrofitOptions.of() == RetrofitOptions()
    assert RetrofitOptions(leaf_modules=["a"], input_size=[3, 8, 8]) == RetrofitOptions(leaf_modules=("a",),
                                                                                        input_size=(3, 8, 8))
    with pytest.raises(OptionError, match=r"unknown option\(s\) 'fuze' \(valid: gate, attn_args, input_size, "
                                          r"leaf_modules, strict, on_existing, fuse, keep_class, scores\)"):
        RetrofitOptions.of(base, fuze=False)
    with pytest.raises(OptionError, match=r"gate='soft' is not valid \(valid: identity, sigmoid\)"):
        RetrofitOptions.of(gate="soft")
    with pytest.raises(OptionError, match=r"options must be a RetrofitOptions, not a dict"):
        RetrofitOptions.of({"gate": "sigmoid"})  # type: ignore[arg-type]


def test_differences_name_each_option_that_differs() -> None:
    a, b = RetrofitOptions(fuse=False, leaf_modules=("x",)), RetrofitOptions()
    assert a.differences(b) == [("leaf_modules", ("x",), ()), ("fuse", False, True)]
    assert a.differences(a.replace()) == []


def test_retrofit_and_plan_take_the_record_or_its_fields_alike() -> None:
    model = _Net().eval()
    options = RetrofitOptions(gate="sigmoid", fuse=False, input_size=16)
    by_record = retrofit.retrofit(model, "se", options=options)
    by_name = retrofit.retrofit(model, "se", gate="sigmoid", fuse=False, input_size=16)
    over = retrofit.retrofit(model, "se", options=options, fuse=True)
    assert retrofit.get_recipe(by_record).options == retrofit.get_recipe(by_name).options
    assert retrofit.get_recipe(by_record).options.fuse is False
    assert retrofit.get_recipe(over).options.fuse is True  # a keyword overrides the record's field
    assert plan(model, "se", options=options).to_dict() == plan(model, "se", gate="sigmoid", input_size=16).to_dict()
    with pytest.raises(OptionError, match=r"unknown option\(s\) 'gates'"):
        retrofit.retrofit(model, "se", gates="sigmoid")


def test_a_recipe_writes_every_option_and_reads_it_back() -> None:
    options = RetrofitOptions(gate="identity", attn_args={"rd_ratio": 0.5}, input_size=(3, 16, 16),
                              leaf_modules=(nn.Conv2d, "stem"), strict=True, on_existing="stack", fuse=False,
                              keep_class=True)
    d = options.to_dict()
    assert set(d) == set(RetrofitOptions.names())
    assert d["leaf_modules"] == ["torch.nn.modules.conv:Conv2d", "stem"]
    back = RetrofitOptions.from_dict(json.loads(json.dumps(d)), "r")
    assert back == options.recorded()
    recipe = Recipe(model="resnet18", rules={"rule": []}, options=options.recorded())
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


@pytest.mark.parametrize("field,value,message", [
    ("fuse", "yes", r"r: recipe field 'fuse' is a str \('yes'\)"),
    ("gate", "soft", r"r: gate='soft' is not valid"),
    ("attn_args", {"1": 2, 3: 4}, r"r: recipe field 'attn_args' must be a table with string keys"),
    ("leaf_modules", [1], r"r: recipe field 'leaf_modules' must be a list of strings"),
    ("input_size", [0, 4], r"r: recipe field 'input_size' is \[0, 4\]; valid: 1 to 3 integers >= 1"),
    ("input_size", [3, 100000, 100000], r"asks for 30000000000 elements per image, over the limit"),
])
def test_a_recipe_option_of_the_wrong_kind_is_named(field: str, value: object, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        RetrofitOptions.from_dict({field: value}, "r")


def test_every_option_has_a_file_type_and_a_default() -> None:
    """What makes an option one field: its default, its type in a recipe, and that it
    survives the trip through a file with its default value."""
    for f in dataclasses.fields(RetrofitOptions):
        assert f.metadata["json"], f.name
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
    assert RetrofitOptions.from_dict(json.loads(json.dumps(RetrofitOptions().to_dict())), "r") == RetrofitOptions()


def test_nothing_selected_is_a_warning_of_its_own_category() -> None:
    doc = {"rule": [{"at": "residual-add", "attn": "se", "include": ["layer9.*"]}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        retrofit.retrofit(_Net(), rules=parse_rules(doc, "none"), input_size=16)
    assert [w.category for w in caught if "selected no site" in str(w.message)] == [NothingSelectedWarning]


def test_the_command_line_passes_its_options_as_one_record(tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert cli_main(["resnet18", "--num-classes", "10", "--input-size", "32", "--no-fuse", "--gate", "sigmoid",
                     "--leaf-module", "layer4", "--out", str(out), "-q"]) == 0
    recorded = retrofit.get_recipe(retrofit.load(out)).options
    assert recorded == RetrofitOptions(gate="sigmoid", input_size=(3, 32, 32), leaf_modules=("layer4",), fuse=False)
