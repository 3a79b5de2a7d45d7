"""Fine-tuning a real retrofitted timm model on the digits, one process, on the CPU."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import retrofit
from retrofit import get_report
from retrofit.errors import ModelLoadError, OptionError
from retrofit.finetune import FinetuneConfig, WarmupCosine, fit
from retrofit.optim import attention_parameter_names, param_groups
from retrofit.saving import load_training_state, save_training_state

from .finetune_helpers import NARROW, build, one_thread, tiny_digits  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp: Path | None = None, **kw) -> FinetuneConfig:
    base = dict(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0.5, progress=False, seed=0,
                out=str(tmp) if tmp else None)
    return FinetuneConfig(**{**base, **kw})


def _same_tensors(a, b) -> bool:
    """Deep equality of nested dicts / lists / tensors."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_tensors(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_loss_goes_down(tmp_path: Path) -> None:
    gm = build("se")
    train, val = tiny_digits()
    result = fit(gm, train, val, _config(tmp_path, epochs=4, lr=0.1))
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.9 * losses[0], losses
    assert result.steps == 4 * (len(train) // 32)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    assert {"train_loss", "val_acc", "lr", "attn_lr", "phase"} <= lines[0].keys()
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()
    # the checkpoint rebuilds the model: same outputs, bit for bit
    again = retrofit.load(tmp_path / "last.pt")
    x = torch.randn(4, 1, 32, 32)
    assert torch.equal(again.eval()(x), gm.eval()(x))
    assert get_report(again).rows == get_report(gm).rows


class _Stop(Exception):
    pass


def test_resume_gives_the_same_state(tmp_path: Path) -> None:
    train, val = tiny_digits(160, 64)
    # attention only for epoch 1, then everything: the resume crosses the phase change
    cfg = dict(epochs=3, attn_only_epochs=1)
    straight = build("cbam")
    fit(straight, train, val, _config(tmp_path / "straight", **cfg))

    def stop_after_first(record: dict) -> None:
        if record["epoch"] == 1:
            raise _Stop

    first = build("cbam")
    with pytest.raises(_Stop):
        fit(first, train, val, _config(tmp_path / "split", **cfg), on_epoch=stop_after_first)
    assert load_training_state(tmp_path / "split" / "last.pt")["epoch"] == 1
    torch.manual_seed(1234)  # a fresh process would start from anything
    resumed = retrofit.load(tmp_path / "split" / "last.pt")
    fit(resumed, train, val, _config(tmp_path / "split", **cfg), resume=tmp_path / "split" / "last.pt")

    assert _same_tensors(straight.state_dict(), resumed.state_dict())
    a = load_training_state(tmp_path / "straight" / "last.pt")
    b = load_training_state(tmp_path / "split" / "last.pt")
    for key in ("model", "optimizer", "scheduler", "epoch", "step", "rng", "best_val_acc"):
        assert _same_tensors(a[key], b[key]), key
    assert a["step"] == 3 * (len(train) // 32)
    drop_time = [{k: v for k, v in r.items() if k != "time_s"} for r in a["history"]]
    assert drop_time == [{k: v for k, v in r.items() if k != "time_s"} for r in b["history"]]
    log = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in log] == [1, 2, 3]


def test_attention_only_epochs_then_unfreeze() -> None:
    gm = build("se")
    train, val = tiny_digits(96, 32)
    attn = attention_parameter_names(gm)
    start = copy.deepcopy(gm.state_dict())
    snapshots = []
    fit(gm, train, val, _config(epochs=2, attn_only_epochs=1),
        on_epoch=lambda r: snapshots.append((r["phase"], copy.deepcopy(gm.state_dict()))))
    (phase1, after1), (phase2, after2) = snapshots
    assert (phase1, phase2) == ("attn-only", "all")
    own = [k for k in start if k not in attn and not k.endswith("num_batches_tracked")]
    assert all(torch.equal(start[k], after1[k]) for k in own), "frozen parameters or BN statistics moved"
    assert all(not torch.equal(start[k], after1[k]) for k in attn if k.endswith("fc2.weight"))
    assert any(not torch.equal(after1[k], after2[k]) for k in own if k.endswith("conv1.weight"))
    assert any(not torch.equal(after1[k], after2[k]) for k in own if k.endswith("running_mean"))
    assert all(p.requires_grad for p in gm.parameters())


def test_param_groups_have_their_learning_rates() -> None:
    gm = build("eca")
    groups = param_groups(gm, lr=0.01, attention_lr_mult=30, weight_decay=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["base"]["lr"] == by_name["base_no_wd"]["lr"] == 0.01
    assert by_name["attn"]["lr"] == pytest.approx(0.3)
    assert by_name["base"]["weight_decay"] == 5e-4 and by_name["base_no_wd"]["weight_decay"] == 0.0
    prefixes = tuple(f"{r.module}." for r in get_report(gm).rows)
    expected = {id(p) for n, p in gm.named_parameters() if n.startswith(prefixes)}
    got = {id(p) for g in groups if g["name"].startswith("attn") for p in g["params"]}
    assert got == expected and expected
    assert sum(len(g["params"]) for g in groups) == len(list(gm.parameters()))
    # a model retrofit did not touch has no attention group
    plain = timm.create_model("resnet18", **NARROW)
    assert {g["name"] for g in param_groups(plain, 0.01, weight_decay=1e-4)} == {"base", "base_no_wd"}


def test_fit_uses_the_attention_lr() -> None:
    gm = build("se")
    train, val = tiny_digits(64, 32)
    result = fit(gm, train, val, _config(epochs=2, lr=0.02, attn_lr=0.5, warmup_epochs=0))
    r = result.history[0]
    assert r["attn_lr"] / r["lr"] == pytest.approx(25.0)
    assert result.history[-1]["lr"] == pytest.approx(0.0)  # the cosine ends at min_lr_ratio * peak


def test_warmup_cosine_schedule() -> None:
    s = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == 1.0 and s(20) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    assert s(12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    after = [s(i) for i in range(4, 21)]
    assert after == sorted(after, reverse=True)
    assert WarmupCosine(0, 10)(0) == 1.0


def test_config_and_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="unknown optimizer 'adam'.*valid: sgd, adamw"):
        FinetuneConfig(optimizer="adam")
    with pytest.raises(OptionError, match="attn_only_epochs must be in 0..epochs=2"):
        FinetuneConfig(epochs=2, attn_only_epochs=3)
    plain = timm.create_model("resnet18", **NARROW)
    train, val = tiny_digits(32, 32)
    with pytest.raises(OptionError, match="has no attention parameters.*use attn_only_epochs=0"):
        fit(plain, train, val, _config(attn_only_epochs=1))
    with pytest.raises(ModelLoadError, match="training checkpoint .*nope.pt' not found"):
        retrofit.load(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="not a retrofit training checkpoint"):
        retrofit.load(tmp_path / "other.pt")
    save_training_state(tmp_path / "norecipe.pt", {"recipe": None, "model": {}})
    with pytest.raises(ModelLoadError, match="has no recipe: it was fine-tuned from a model retrofit\\(\\) did not build"):
        retrofit.load(tmp_path / "norecipe.pt")


def test_checkpoint_carries_the_recipe(tmp_path: Path) -> None:
    gm = build("cbam", gate="sigmoid")
    train, val = tiny_digits(32, 32)
    fit(gm, train, val, _config(tmp_path, epochs=1))
    ckpt = load_training_state(tmp_path / "best.pt")
    recipe = retrofit.Recipe.from_dict(ckpt["recipe"])
    assert recipe == retrofit.get_recipe(gm)
    assert recipe.model == "resnet18" and recipe.options.gate == "sigmoid" and recipe.options.input_size == (1, 32, 32)
    assert recipe.model_kwargs == {**NARROW, "channels": [16, 32, 64, 128]}
    assert ckpt["versions"]["torch"] == torch.__version__ and "bn1.running_mean" in ckpt["buffers"]


def test_choose_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from retrofit.distributed import choose_device

    assert choose_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert choose_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device(local_rank=3) == torch.device("cuda", 1)


@pytest.mark.slow  # two launches of the example, ~35 s on 2 busy cores
def test_finetune_example_runs_and_resumes(tmp_path: Path) -> None:
    args = [sys.executable, "examples/finetune.py", "--digits", "--model", "resnet18", "--model-kwargs",
            json.dumps({"channels": [16, 32, 64, 128], "stem_type": "deep", "stem_width": 8}), "--attn", "eca", "--workers", "0",
            "--batch-size", "128", "--no-progress", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*args, "--epochs", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "exact identity" in r.stdout and "best val acc" in r.stdout
    r = subprocess.run([*args, "--epochs", "2", "--resume", str(tmp_path / "last.pt")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert load_training_state(tmp_path / "last.pt")["epoch"] == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_imagefolder_datasets_use_the_models_data_config(tmp_path: Path) -> None:
    from PIL import Image

    from retrofit.data import imagefolder_datasets

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (40 * i, 100, 200)).save(tmp_path / split / cls / f"{i}.png")
    base = timm.create_model("resnet18", num_classes=2, channels=(16, 32, 64, 128))
    gm = retrofit.retrofit(base, "se", input_size=(3, 32, 32), verify=False)
    data = imagefolder_datasets(tmp_path, gm)
    assert data.classes == ("cat", "dog") and data.input_size == (3, 224, 224)
    x, y = data.val[3]
    assert x.shape == (3, 224, 224) and y == 1
    assert data.train[0][0].shape == (3, 224, 224)
    with torch.no_grad():
        assert gm.eval()(x[None]).shape == (1, 2)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "wolf")
    with pytest.raises(OptionError, match="have different classes"):
        imagefolder_datasets(tmp_path, gm)
    with pytest.raises(OptionError, match="is not a folder; --data expects .*ImageFolder layout"):
        imagefolder_datasets(tmp_path / "nothing", gm)


def test_unreadable_training_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(ModelLoadError, match="cannot read training checkpoint .*expected a last.pt or best.pt"):
        load_training_state(tmp_path / "metrics.jsonl")
