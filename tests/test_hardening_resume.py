"""Resuming from a training checkpoint from someone else (or a damaged disk): the checkpoint
is a :class:`~retrofit.checkpoint.TrainingCheckpoint`, checked whole before anything is
loaded. Every bad one is a ModelLoadError naming what is wrong (the example's exit 2, one
line), and leaves the model and the optimizer as they were; none hangs.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import retrofit
from retrofit import ModelLoadError
from retrofit.checkpoint import TrainingCheckpoint
from retrofit.finetune import FinetuneConfig, fit
from retrofit.saving import load_training_state, save_training_state

from .finetune_helpers import build, tiny_digits
from .timeouts import deadline

ROOT = Path(__file__).resolve().parents[1]


def _config(out: Path, epochs: int = 2) -> FinetuneConfig:
    return FinetuneConfig(epochs=epochs, batch_size=32, lr=0.05, warmup_epochs=0.5, progress=False, out=str(out))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch of a real run: its last.pt and best.pt."""
    out = tmp_path_factory.mktemp("run")
    train, val = tiny_digits(64, 32)
    fresh = build("se", seed=1)
    fit(build("se"), train, val, _config(out, epochs=1))
    return {"out": out, "last": load_training_state(out / "last.pt"), "data": (train, val), "fresh": fresh}


def _edited(run: dict[str, Any], tmp_path: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    ckpt = copy.deepcopy(run["last"])
    edit(ckpt)
    return save_training_state(tmp_path / "last.pt", ckpt)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda c: c.__setitem__(key, value)


def _other_weights(c: dict[str, Any]) -> None:
    c["model"] = build("eca").state_dict()


def _bad_momentum(c: dict[str, Any]) -> None:
    c["optimizer"]["state"][0] = {"momentum_buffer": torch.zeros(3)}


def _extra_group(c: dict[str, Any]) -> None:
    c["optimizer"]["param_groups"].append(dict(c["optimizer"]["param_groups"][0]))


def _scheduler_attribute(c: dict[str, Any]) -> None:
    c["scheduler"]["optimizer"] = "replaced"


CASES = [
    ("missing key", lambda c: c.pop("scheduler"), r"the checkpoint lacks 'scheduler'"),
    ("empty rng", _set("rng", []), r"its 'rng' holds no random state"),
    ("string epoch", _set("epoch", "1"), r"its 'epoch' is a str \('1'\)"),
    ("negative epoch", _set("epoch", -10**9), r"epoch -1000000000 and step .* must be >= 0"),
    ("epoch past the run", lambda c: c.update(epoch=50, history=c["history"] * 50),
     r"the checkpoint is at epoch 50, past this run's epochs = 2"),
    ("huge step", _set("step", 10**12), r"step 1000000000000 is more than 1 epochs"),
    ("other model's weights", _other_weights, r"its weights are not this model's: it lacks .* of the model's tensors"),
    ("weights of another shape", lambda c: c["model"].__setitem__("fc.weight", torch.zeros(3, 3)),
     r"holds 'fc.weight' as \[3, 3\], the model \[10, 128\]"),
    ("optimizer state of another shape", _bad_momentum, r"its optimizer state 'momentum_buffer' of parameter 0"),
    ("optimizer with another group", _extra_group, r"its optimizer has 5 parameter groups, this run's 4"),
    ("optimizer group lr a string", lambda c: c["optimizer"]["param_groups"][0].update(lr="fast"),
     r"its optimizer's group 0 sets lr to 'fast'"),
    ("scheduler setting an attribute", _scheduler_attribute,
     r"its scheduler state sets 'optimizer', which this run's scheduler does not have"),
    ("rng of another layout", lambda c: c["rng"][0].update(python=(3, (1, 2), None)),
     r"random state 0: its python state is not"),
    ("best.pt resumed", lambda c: c.update(optimizer=None, scheduler=None),
     r"holds no optimizer and scheduler state \(a best.pt holds the weights only\)"),
    ("history of another length", _set("history", []), r"its history has 0 records for 1 epochs done"),
    ("not a checkpoint", lambda c: c.update(format="retrofit/2"), r"is not a retrofit training checkpoint"),
]


@pytest.mark.parametrize("name,edit,message", CASES, ids=[c[0] for c in CASES])
def test_a_bad_checkpoint_leaves_the_run_untouched(run: dict[str, Any], tmp_path: Path, name: str,
                                                   edit: Callable[[dict[str, Any]], object], message: str) -> None:
    path = _edited(run, tmp_path, edit)
    model = copy.deepcopy(run["fresh"])
    before = copy.deepcopy(model.state_dict())
    train, val = run["data"]
    with deadline(60), pytest.raises(ModelLoadError, match=message):
        fit(model, train, val, _config(tmp_path / "out"), resume=path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "out" / "last.pt").exists()


def test_the_record_round_trips_and_a_good_checkpoint_resumes(run: dict[str, Any], tmp_path: Path) -> None:
    ckpt = TrainingCheckpoint.from_dict(run["last"], "last.pt")
    assert ckpt.epoch == 1 and ckpt.step == 2 and len(ckpt.history) == 1 and ckpt.optimizer is not None
    again = TrainingCheckpoint.from_dict(ckpt.to_dict(), "last.pt")
    assert again.epoch == ckpt.epoch and again.model.keys() == ckpt.model.keys()
    model = retrofit.load(run["out"] / "last.pt")
    train, val = run["data"]
    result = fit(model, train, val, _config(tmp_path), resume=run["out"] / "last.pt")
    assert [r["epoch"] for r in result.history] == [1, 2] and result.steps == 4


def test_the_example_exits_2_with_one_line(run: dict[str, Any], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from finetune import main
    finally:
        sys.path.remove(str(ROOT / "examples"))
    path = _edited(run, tmp_path, _set("epoch", -10**9))
    code = main(["--digits", "--epochs", "2", "--batch-size", "32", "--no-progress", "--workers", "0",
                 "--out", str(tmp_path / "out"), "--resume", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "must be >= 0" in err, err
