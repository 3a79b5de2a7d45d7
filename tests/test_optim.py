"""retrofit.param_groups and retrofit.optim.split_groups: the attention's own learning rate,
for any optimizer, through the wrappers training puts around a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import retrofit
from retrofit.optim import attention_parameter_names, split_groups

from .finetune_helpers import build


class _Wrapped(nn.Module):
    """What DistributedDataParallel and DataParallel look like from outside: `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _ids(params: list[nn.Parameter]) -> set[int]:
    return {id(p) for p in params}


def test_param_groups_split_the_attention_out_at_its_own_rate() -> None:
    model = build("se")
    attention = {id(p) for n, p in model.named_parameters() if ".se." in n}
    groups = retrofit.param_groups(model, 0.01, attention_lr_mult=10, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert sorted(by_name) == ["attn", "attn_no_wd", "base", "base_no_wd"]
    assert _ids(by_name["attn"]["params"]) | _ids(by_name["attn_no_wd"]["params"]) == attention
    assert by_name["attn"]["lr"] == pytest.approx(0.1) and by_name["base"]["lr"] == 0.01
    assert by_name["attn_no_wd"]["weight_decay"] == 0.0 and by_name["attn"]["weight_decay"] == 1e-4
    torch.optim.AdamW(groups).step()  # any optimizer takes them


def test_wrapped_models_find_their_attention() -> None:
    model = build("se")
    want = {n for n, _ in model.named_parameters() if ".se." in n}
    assert attention_parameter_names(model) == want
    assert attention_parameter_names(_Wrapped(model)) == {f"module.{n}" for n in want}
    compiled = torch.compile(model)  # an OptimizedModule, not compiled until it runs
    assert attention_parameter_names(compiled) == {f"_orig_mod.{n}" for n in want}
    groups = retrofit.param_groups(_Wrapped(model), 0.01)
    assert {g["name"] for g in groups} == {"attn", "attn_no_wd", "base", "base_no_wd"}


def test_split_groups_keeps_another_librarys_groups() -> None:
    model = build("se")
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    theirs = [{"params": decay, "lr": 0.02, "weight_decay": 0.05, "name": "decay"},
              {"params": no_decay, "lr": 0.02, "weight_decay": 0.0, "name": "no_decay"}]
    groups = split_groups(theirs, model, attention_lr_mult=5)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in groups] == [
        ("decay", 0.02, 0.05), ("decay", pytest.approx(0.1), 0.05),
        ("no_decay", 0.02, 0.0), ("no_decay", pytest.approx(0.1), 0.0)]
    attention = {id(p) for n, p in model.named_parameters() if ".se." in n}
    assert _ids(groups[1]["params"]) | _ids(groups[3]["params"]) == attention
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("mult", [0, -1.0, True, "10"])
def test_a_multiplier_that_is_not_positive_is_refused(mult: object) -> None:
    with pytest.raises(retrofit.OptionError, match=r"attention_lr_mult = .* is not valid: a positive number"):
        retrofit.param_groups(build("se"), 0.01, attention_lr_mult=mult)  # type: ignore[arg-type]
