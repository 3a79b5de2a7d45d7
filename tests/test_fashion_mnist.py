"""Fashion-MNIST: the IDX reader, the loader's splits and errors, and the experiment's whole
pipeline on a tiny IDX set the test writes itself (CI has no Debian package)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fashion_mnist as fm  # examples/ is on sys.path through conftest.py
import jobs
import numpy as np
import pytest
import torch
from example_data import FASHION_MNIST_CLASSES, fashion_mnist_datasets, load_fashion_mnist, read_idx

from retrofit.errors import DataError, OptionError

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """An IDX file as the MNIST page describes it: 0, 0, type code, ndim, big-endian dims, data."""
    codes = {np.dtype("uint8"): 0x08, np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D}
    head = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = head + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def make_fashion(root: Path, n_train: int = 200, n_test: int = 100, compress: bool = True) -> Path:
    """A tiny Fashion-MNIST: 28x28 images whose brightest row tells the class (learnable)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        images[np.arange(n), 2 + 2 * labels, :] = 250
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels, compress)
    return root


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", ["uint8", "int32", "float32"])
def test_read_idx_round_trip(tmp_path: Path, compress: bool, dtype: str) -> None:
    array = (np.arange(2 * 3 * 5) * 37 - 100).astype(dtype).reshape(2, 3, 5) if dtype != "uint8" else \
        (np.arange(30) * 7 % 256).astype(np.uint8).reshape(2, 3, 5)
    got = read_idx(write_idx(tmp_path / "x.idx", array, compress))
    assert got.shape == (2, 3, 5)
    assert torch.equal(got, torch.from_numpy(array.astype(array.dtype.newbyteorder("="))))


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "text").write_text("not an idx file at all")
    with pytest.raises(DataError, match=r"is not an IDX file \(magic number 6e6f7420\)"):
        read_idx(tmp_path / "text")
    good = write_idx(tmp_path / "a.idx", np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "cut").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"holds 3126 data bytes; its header \[4, 28, 28\] needs 3136"):
        read_idx(tmp_path / "cut")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataError, match="cannot read IDX file .*missing"):
        read_idx(tmp_path / "missing")


def test_missing_data_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no train-images-idx3-ubyte\[.gz\] in .*apt-get update && apt-get install "
                                        r"-y dataset-fashion-mnist.*--data-root DIR"):
        fashion_mnist_datasets(tmp_path)
    assert "\n" not in str(pytest.raises(DataError, load_fashion_mnist, tmp_path).value)


def test_splits(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm", compress=False)
    images, labels = load_fashion_mnist(root, "train")
    assert images.dtype == torch.uint8 and images.shape == (200, 28, 28) and labels.dtype == torch.int64
    data = fashion_mnist_datasets(root, val_size=50, augment=False)
    assert (len(data.train), len(data.val), len(data.test)) == (150, 50, 100)
    assert data.classes == FASHION_MNIST_CLASSES and data.input_size == (1, 28, 28)
    # stratified: 5 of each class's 20 images go to validation
    assert data.val.tensors[1].bincount().tolist() == [5] * 10
    # the validation images are training images, and none is also in the training split
    val_x, train_x = data.val.tensors[0], data.train.tensors[0]
    assert not (val_x.flatten(1)[:, None] == train_x.flatten(1)[None]).all(-1).any()
    # normalised with the training set's mean and std
    x = (images.float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(torch.cat([val_x, train_x]).sum(0), x.sum(0).unsqueeze(0), atol=1e-3)
    # the split is fixed by split_seed
    again = fashion_mnist_datasets(root, val_size=50, augment=False)
    assert torch.equal(again.val.tensors[0], val_x)
    other = fashion_mnist_datasets(root, val_size=50, augment=False, split_seed=1)
    assert not torch.equal(other.val.tensors[0], val_x)
    low = fashion_mnist_datasets(root, val_size=50, train_fraction=0.2, augment=False)
    assert low.train.tensors[1].bincount().tolist() == [3] * 10 and torch.equal(low.val.tensors[0], val_x)
    assert len(fashion_mnist_datasets(root, val_size=0).val) == 0


def test_augmentation_shifts_and_flips(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    plain = fashion_mnist_datasets(root, val_size=0, augment=False).train
    aug = fashion_mnist_datasets(root, val_size=0, shift=2, flip=True).train
    torch.manual_seed(0)
    x0 = plain[0][0]
    seen = {tuple(aug[0][0].flatten().tolist()) for _ in range(40)}
    assert len(seen) > 10  # 25 shifts x 2 flips
    assert all(aug[0][0].shape == x0.shape for _ in range(3))
    assert aug[0][1] == plain[0][1]


def test_bad_options(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm")
    with pytest.raises(OptionError, match=r"train_fraction must be in \(0, 1\], not 0"):
        fashion_mnist_datasets(root, train_fraction=0)
    with pytest.raises(OptionError, match=r"val_size must be in 0..199, not 200"):
        fashion_mnist_datasets(root, val_size=200)
    with pytest.raises(OptionError, match="split 'val' is not valid"):
        load_fashion_mnist(root, "val")


@pytest.mark.examples
def test_experiment_pipeline(tmp_path: Path) -> None:
    """examples/fashion_mnist.py end to end on the tiny set: both experiments, the selection
    on the first seed, the other seed using its choice, the low-data run, the report; run by
    `--only lab` beside two `--only retrofit` processes on one --out: every unit runs exactly
    once (claims), and the one waiting for the first seed's selection still finishes."""
    root = make_fashion(tmp_path / "fm", n_train=300, n_test=100)
    out = tmp_path / "out"
    cmd = [sys.executable, "examples/fashion_mnist.py", "--data-root", str(root), "--out", str(out),
           "--work", str(tmp_path / "work"), "--seeds", "0", "1", "--val-size", "50", "--lab-epochs", "1",
           "--base-epochs", "1", "--epochs", "1", "--low-epochs", "1", "--attn", "se", "--sigmoid-attn", "se",
           "--grid-lr", "10", "1", "--grid-warmup", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd + ["--resume", "--threads", "1", "--only", part], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for part in ("lab", "retrofit", "retrofit")]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outputs]
    started = [line.split("] ")[1].removesuffix(" ...") for o, _ in outputs for line in o.splitlines()
               if line.startswith("[") and line.endswith(" ...")]
    units = sorted(p.stem for p in (out / "units").glob("*.json"))
    assert sorted(k.replace("/", "__") for k in started) == units and not list((out / "units").glob("*.claim"))
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] and res["units"] == {"done": 2 * (4 + 1 + 2 * 3) + 2, "total": 24}
    lab = {row["name"]: row for row in res["lab"]["rows"]}
    assert list(lab) == ["baseline", "se", "se-identity", "self-attention"]
    assert lab["baseline"]["params"] == 50_186 and lab["se"]["params"] == lab["se-identity"]["params"] == 51_834
    assert all(len(row["test_acc"]) == 2 and all(0 <= a <= 1 for a in row["test_acc"]) for row in lab.values())
    rf = res["retrofit"]
    assert len(rf["baseline_acc"]) == 2
    rows = {row["name"]: row for row in rf["rows"]}
    assert list(rows) == ["baseline-continued", "se-identity", "se-sigmoid"]
    assert rows["se-identity"]["params_added"] == rows["se-sigmoid"]["params_added"] == 8_224
    # identity insertion keeps the pretrained baseline's accuracy exactly, per seed
    assert rows["se-identity"]["acc_at_insertion"] == rf["baseline_acc"]
    assert set(rf["selection"]) == {"se-identity", "se-sigmoid"}
    for name, sel in rf["selection"].items():
        assert sorted(sel["val_acc"]) == ["attn-lr-x10_attn-only-0", "attn-lr-x1_attn-only-0"]
        assert sel["chosen"] == rows[name]["config"]
        assert sel["val_acc"][sel["chosen"]] == max(sel["val_acc"].values())
    low = {row["name"]: row for row in res["retrofit_low_data"]["rows"]}
    assert list(low) == list(rows) and low["se-identity"]["acc_at_insertion"] == rf["baseline_acc"]
    assert low["se-identity"]["train_images"] == 20  # 10% of each class's 25 training images (round half to even)
    md = (out / "results.md").read_text()
    assert "| se-identity | 8,224 |" in md and "complete" in md
    assert "--only" not in md and "--threads" not in md  # the one command that continues the whole run
    for png in ("curves.png", "gates_se-identity.png", "gates_se-sigmoid.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second start refuses to mix runs; --resume finds every unit done and runs nothing
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert r.returncode == 2 and "pass --resume" in r.stderr
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0 and " ..." not in r.stdout
    (out / "results.md").unlink()
    r = subprocess.run(cmd + ["--report-only"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert r.returncode == 0 and " ..." not in r.stdout
    md = (out / "results.md").read_text()
    # every run of the first seed, both grid points of the selection
    assert "| se-identity | ×10, 0 ep |" in md and "| se-identity | ×1, 0 ep |" in md


def test_a_claim_left_by_a_stopped_process_is_taken_over(tmp_path: Path) -> None:
    units = jobs.Units(tmp_path)
    claim = units.claim_path("lab/se/seed0")
    claim.write_text(str(os.getppid()))  # a live process holds it
    assert units.run("lab/se/seed0", lambda: {"x": 1}, lambda: None, wait=False) is None
    claim.write_text(str(2**22 + 1))  # above Linux's pid limit: no such process
    assert units.run("lab/se/seed0", lambda: {"x": 1}, lambda: None, wait=False)["x"] == 1
    assert not claim.exists() and units.get("lab/se/seed0")["x"] == 1


def test_a_base_another_process_trains_is_skipped_not_waited_for(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes train the bases of seeds 1 and 2 side by side instead of one waiting."""
    runner = fm.Runner(fm.FULL, tmp_path / "out", tmp_path / "work", None, "cmd")
    trained = []

    def fake_base_unit(seed: int, s: Any, data: Any, weights: Path) -> dict[str, Any]:
        trained.append(seed)
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(b"weights of seed %d" % seed)
        return {"seed": seed}

    monkeypatch.setattr(fm, "base_unit", fake_base_unit)
    monkeypatch.setattr(fm, "write_report", lambda *a: None)
    monkeypatch.setattr(runner, "data", lambda kind: None)
    runner.units.claim_path("retrofit/base/seed1").write_text(str(os.getppid()))  # held
    assert runner.train_base(1, wait=False) is False
    assert runner.train_base(2, wait=False) is True and trained == [2]
    assert runner.train_base(2, wait=False) is True and trained == [2]  # exists: not trained again
    digest = jobs.file_digest(tmp_path / "work" / "base-seed2.safetensors")
    assert runner.units.get("retrofit/base/seed2")["weights_sha256"] == digest
