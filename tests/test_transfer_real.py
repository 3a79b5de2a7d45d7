"""examples/transfer_real.py, the transfer experiments at real scale, end to end on tiny
slices with random weights (``examples`` marker); its offline failures are one line each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .test_ultralytics import make_data

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "examples/transfer_real.py", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=full)


def _image_folder(root: Path, per_split: dict[str, int]) -> Path:
    """Three classes of 32x32 images, a bright square whose place tells the class."""
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for k, name in enumerate(("left", "middle", "right")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                img[12:20, 2 + 10 * k:10 + 10 * k] = 250
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.examples
def test_real_scale_script_end_to_end_on_a_tiny_slice(tmp_path: Path) -> None:
    det_data = make_data(tmp_path / "det", "detect", n_train=10, n_val=4)
    det = tmp_path / "detection"
    r = _run(["detect", "--weights", "yolov8n.yaml", "--data", str(det_data), "--sizes", "2", "4", "--epochs", "1",
              "1", "--val", "2", "--imgsz", "64", "--batch", "2", "--seeds", "0", "1", "--grid-lr", "1",
              "--variants", "plain", "gc-backbone", "--gate-images", "4", "--out", str(det)])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((det / "results.json").read_text())
    assert "random weights" in res["source"]["description"]
    for size in ("2", "4"):
        gc = res["sizes"][size]["rows"]["gc-backbone"]["units"]
        # 80 classes in the random source, 3 in the data: the class branch is new, and still
        # the identity run starts where plain fine-tuning starts
        assert [u["seed"] for u in gc] == [0, 1] and all(u["equal_to_plain_at_insertion"] for u in gc)
    lists = det / "runs" / "data"
    val, train2, train4 = ((lists / f).read_text().splitlines() for f in ("val.txt", "train-2.txt", "train-4.txt"))
    assert len(val) == 2 and train4[:2] == train2 and not set(val) & set(train4)

    cls_data = _image_folder(tmp_path / "folder", {"train": 4, "val": 2, "test": 2})
    cls = tmp_path / "classification"
    r = _run(["classify", "--model", "resnet18", "--data", str(cls_data), "--img-size", "32", "--sizes", "2", "4",
              "--epochs", "1", "1", "--batch-size", "4", "--seeds", "0", "1", "--grid-lr", "1", "--variants",
              "plain", "se", "--out", str(cls)])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((cls / "results.json").read_text())
    for size, n in (("2", 6), ("4", 12)):
        se = res["sizes"][size]["rows"]["se"]["units"]
        assert [u["train_images"] for u in se] == [n, n] and all(u["equal_to_plain_at_insertion"] for u in se)
        assert all(u["test_images"] == 6 for u in se)

    page = tmp_path / "report" / "transfer.md"
    r = _run(["report", "--detection", str(det), "--classification", str(cls), "--page", str(page)])
    assert r.returncode == 0, r.stderr[-3000:]
    text = page.read_text()
    assert "Source model: timm resnet18, random weights: a smoke run." in text
    assert "Source model: yolov8n.yaml (as given), random weights: a smoke run." in text
    assert "| (c) global context after the backbone stages, identity | 11,934 |" in text


@pytest.mark.examples
def test_real_scale_script_fails_fast_offline(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "folder", {"train": 1, "val": 1, "test": 1})
    t0 = time.perf_counter()
    # an empty weights cache and a hub that does not answer: what a machine without the network sees
    r = _run(["classify", "--model", "resnet18", "--pretrained", "--data", str(folder), "--sizes", "1", "--epochs",
              "1", "--out", str(tmp_path / "out")], timeout=120, HF_HOME=str(tmp_path / "hf"),
             HF_ENDPOINT="http://127.0.0.1:9")
    assert r.returncode == 2 and time.perf_counter() - t0 < 60
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("transfer_real: error: cannot download pretrained "
                                                             "weights for 'resnet18'")
    assert not (tmp_path / "out").exists()  # nothing started
    r = _run(["detect", "--weights", str(tmp_path / "yolov8n.pt"), "--data", "VOC.yaml", "--sizes", "1",
              "--epochs", "1", "--out", str(tmp_path / "det")], timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "yolov8n.pt not found; Ultralytics would download it" \
        in r.stderr
    r = _run(["classify", "--model", "resnet18", "--data", str(tmp_path / "nowhere"), "--sizes", "1", "--epochs", "1",
              "--out", str(tmp_path / "cls")], timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nowhere/test is not a folder" in r.stderr
