"""The examples run as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_retrofit_timm_example() -> None:
    r = subprocess.run([sys.executable, "examples/retrofit_timm.py", "resnet18", "eca"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "outputs identical to the original: True" in r.stdout
    assert "layer4.1.eca" in r.stdout


@pytest.mark.examples
def test_yolo_example_end_to_end(tmp_path: Path) -> None:
    """examples/yolo.py on a few canvases made from generated IDX files: the data set, the
    base, the three variants, the report; identity CBAM starts exactly at the base's mAP."""
    from .test_fashion_mnist import make_fashion

    source = make_fashion(tmp_path / "fmnist", n_train=120, n_test=60)
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = [sys.executable, "examples/yolo.py", "--out", str(out), "--runs", str(runs), "--fashion-mnist", str(source),
            "--seeds", "0", "--base-epochs", "1", "--epochs", "1", "--train", "24", "--val", "8", "--test", "8",
            "--batch", "8", "--canvas", "64", "--imgsz", "64"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "YOLO_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    units = {u["variant"]: u for u in result["units"]}
    assert sorted(units) == ["cbam-identity", "cbam-sigmoid", "plain"]
    assert units["cbam-identity"]["map_at_insertion"] == result["base"]["map_val"]
    assert units["cbam-identity"]["attention_tensors"] == 24 and units["plain"]["attention_tensors"] == 0
    assert "| (b) + CBAM, identity gates (retrofit)" in (out / "results.md").read_text()
    labels = sorted((runs / "data" / "labels" / "train").iterdir())
    assert len(labels) == 24 and all(line.split()[0] in "0123456789" for line in labels[0].read_text().splitlines())
    # --resume finds every run done and only rewrites the report.
    r = subprocess.run([*args, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "YOLO_OFFLINE": "1"})
    assert r.returncode == 0 and json.loads((out / "results.json").read_text())["units"] == result["units"]


@pytest.mark.examples
def test_hf_trainer_example(tmp_path: Path) -> None:
    """examples/hf_trainer.py: a small ConvNeXt retrofitted, trained one epoch by transformers'
    Trainer with the attention's own learning rate, saved by save_model, reloaded by
    retrofit.load with the same outputs."""
    from .test_snippets import _images

    images = _images(tmp_path / "images")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "examples/hf_trainer.py", "--model-class", "ConvNextForImageClassification",
                        "--tiny", "--data", str(images), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                        "--workers", "0"], capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reloaded with retrofit.load: same outputs" in r.stdout
    assert "retrofit" in json.loads((out / "config.json").read_text())
