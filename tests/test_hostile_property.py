"""Property: a save or a training checkpoint edited at random, as an attacker would, ends in
success or a RetrofitError, within a time and memory budget, and runs no code.

Three files from someone else: a YOLO save (whose recipe carries an Ultralytics yaml that
Ultralytics would evaluate), a transformers save (a config), and a training checkpoint
resumed by ``fit``. Each gets random edits: keys removed, values replaced by random JSON
values (huge numbers included), nesting, a yaml named instead of carried (random yaml with
aliases, or an expression that would create a canary file). The default run tries a few
examples of each; ``pytest -m slow`` many more (``RETROFIT_HOSTILE_EXAMPLES``).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import retrofit
from retrofit import RetrofitError
from retrofit.finetune import FinetuneConfig, fit
from retrofit.saving import load_training_state, save_training_state

from .finetune_helpers import build, tiny_digits
from .hostile_yolo import canary_activation
from .test_corruption_property import header_edits, json_values
from .timeouts import Hang, deadline

SECONDS_PER_EXAMPLE = 45
MEMORY_BUDGET_KB = 2 << 20  # 2 GiB of peak memory more than before the example
SLOW_EXAMPLES = int(os.environ.get("RETROFIT_HOSTILE_EXAMPLES", "300"))


def _settings(n: int) -> Any:
    return settings(max_examples=n, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def hf_save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = retrofit.create_model("transformers:ResNetForImageClassification", num_labels=3, embedding_size=8,
                                      hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1])
        gm = retrofit.retrofit(model, "se", input_size=32)
    return retrofit.save(gm, tmp_path_factory.mktemp("hf") / "save")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("run")
    train, val = tiny_digits(64, 32)
    fit(build("se"), train, val, FinetuneConfig(epochs=1, batch_size=32, progress=False, out=str(out)))
    return {"last": load_training_state(out / "last.pt"), "data": (train, val), "fresh": build("se", seed=1)}


def _within_budget(step: Any, what: str) -> None:
    """Run ``step``: success or a RetrofitError, under the time and memory budgets."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with deadline(SECONDS_PER_EXAMPLE), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            step()
        except RetrofitError as e:
            assert "\n" not in str(e).strip(), f"{what}: a message of several lines: {e}"
        except Hang as e:
            raise AssertionError(f"{what}: still running after {SECONDS_PER_EXAMPLE} s") from e
        except BaseException as e:
            raise AssertionError(f"{what}: raised {type(e).__name__}: {e}") from e
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < MEMORY_BUDGET_KB, f"{what}: peak memory grew by {grown / 2**20:.1f} GiB"


random_yaml = st.one_of(
    st.builds(lambda v: yaml.safe_dump(v), json_values),
    st.sampled_from([
        "a: &a [1, 2]\nb: [*a, *a]\nbackbone: *a\n",
        "backbone: " + "[" * 300 + "]" * 300 + "\n",
        "nc: 4\nbackbone: [[-1, 1, Conv, [8, 3, 2]]]\nhead: [[[0], 1, Detect, [nc]]]\nscales: {n: [1e9, 1, 8]}\n",
        "!!python/object/apply:os.system ['true']\n",
    ]),
)


@st.composite
def yolo_edits(draw: st.DrawFn, save: Path, dest: Path, canary: Path) -> str:
    """A copy of ``save`` at ``dest`` with its recipe edited; what was done."""
    shutil.copytree(save, dest)
    header = json.loads((dest / "recipe.json").read_text())
    if draw(st.booleans()):  # a yaml named instead of carried: random, or with the canary's expression
        recipe = header["recipe"]
        while recipe.get("base"):
            recipe = recipe["base"]
        cfg = recipe["model_kwargs"].pop("cfg")
        if draw(st.booleans()):
            text = yaml.safe_dump({**cfg, "activation": canary_activation(canary)})
        else:
            text = draw(random_yaml)
        (dest / "net.yaml").write_text(text)
        recipe["model"] = "ultralytics:" + draw(st.sampled_from(["net.yaml", "../net.yaml", "yolov8n.yaml"]))
        (dest / "recipe.json").write_text(json.dumps(header))
        return f"yaml named: {text[:200]!r}"
    text = draw(header_edits(header, (50, 200, 5000)))
    (dest / "recipe.json").write_text(text)
    return f"fields: {text[:300]}"


@_settings(12)
@given(data=st.data())
def test_an_edited_yolo_save(yolo_save: Path, data: st.DataObject) -> None:
    _yolo_case(yolo_save, data)


@pytest.mark.slow
@_settings(SLOW_EXAMPLES)
@given(data=st.data())
def test_an_edited_yolo_save_many(yolo_save: Path, data: st.DataObject) -> None:
    _yolo_case(yolo_save, data)


def _yolo_case(yolo_save: Path, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        canary = Path(tmp) / "CANARY"
        what = data.draw(yolo_edits(yolo_save, Path(tmp) / "save", canary), label="edit")
        trust = data.draw(st.booleans(), label="trust_code")
        _within_budget(lambda: retrofit.load(Path(tmp) / "save", trust_code=trust), f"{what} (trust {trust})")
        assert not canary.exists(), f"{what}: the yaml's code ran"


def _hf_case(hf_save: Path, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(hf_save, Path(tmp) / "save")
        header = json.loads((hf_save / "recipe.json").read_text())
        text = data.draw(header_edits(header, (50, 200, 5000)), label="recipe")
        (Path(tmp) / "save" / "recipe.json").write_text(text)
        _within_budget(lambda: retrofit.load(Path(tmp) / "save"), f"fields: {text[:300]}")


@_settings(8)
@given(data=st.data())
def test_an_edited_transformers_save(hf_save: Path, data: st.DataObject) -> None:
    _hf_case(hf_save, data)


@pytest.mark.slow
@_settings(SLOW_EXAMPLES)
@given(data=st.data())
def test_an_edited_transformers_save_many(hf_save: Path, data: st.DataObject) -> None:
    _hf_case(hf_save, data)


_CHECKPOINT_KEYS = ["recipe", "versions", "buffers", "model", "optimizer", "scheduler", "epoch", "step", "rng",
                    "config", "history", "best_val_acc", "best_epoch", "format"]


@st.composite
def checkpoint_edits(draw: st.DrawFn, last: dict[str, Any]) -> tuple[dict[str, Any], str]:
    ckpt = copy.deepcopy(last)
    done = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(_CHECKPOINT_KEYS))
        op = draw(st.sampled_from(["delete", "retype", "number", "inner"]))
        if op == "delete":
            ckpt.pop(key, None)
        elif op == "retype":
            ckpt[key] = draw(json_values)
        elif op == "number":
            ckpt[key] = draw(st.sampled_from([-10**9, -1, 0, 10**9, 2**63, 1e308, float("nan")]))
        elif isinstance(ckpt.get(key), dict) and ckpt[key]:
            inner = draw(st.sampled_from(sorted(map(str, ckpt[key]))))
            target = {str(k): k for k in ckpt[key]}[inner]
            ckpt[key][target] = draw(json_values | st.just(torch.zeros(3)))
        done.append(f"{op} {key}")
    return ckpt, ", ".join(done)


def _resume_case(run: dict[str, Any], data: st.DataObject) -> None:
    ckpt, what = data.draw(checkpoint_edits(run["last"]), label="edits")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_training_state(Path(tmp) / "last.pt", ckpt)
        model = copy.deepcopy(run["fresh"])
        before = copy.deepcopy(model.state_dict())
        train, val = run["data"]
        config = FinetuneConfig(epochs=2, batch_size=32, progress=False, out=str(Path(tmp) / "out"))
        failed: list[bool] = []

        def resume() -> None:
            try:
                fit(model, train, val, config, resume=path)
            except RetrofitError:
                failed.append(True)
                raise

        _within_budget(resume, what)
        if failed:
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), f"{what}: model changed"


@_settings(10)
@given(data=st.data())
def test_an_edited_training_checkpoint(run: dict[str, Any], data: st.DataObject) -> None:
    _resume_case(run, data)


@pytest.mark.slow
@_settings(SLOW_EXAMPLES)
@given(data=st.data())
def test_an_edited_training_checkpoint_many(run: dict[str, Any], data: st.DataObject) -> None:
    _resume_case(run, data)
