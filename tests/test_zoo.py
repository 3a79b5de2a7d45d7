"""The zoo sweep: a representative slice by default, the whole zoo with ``pytest -m zoo``."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("zoo_sweep", ROOT / "scripts" / "zoo_sweep.py")
zoo_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zoo_sweep)  # type: ignore[union-attr]

SLICE = [
    ("timm", "resnet18"),  # basic blocks, projection shortcuts
    ("timm", "seresnext26d_32x4d"),  # existing SE, stacked on request
    ("timm", "dla34"),  # tree aggregation: adds of several branches
    ("timm", "ghostnet_100"),  # ghost modules: concatenations inside the branch
    ("timm", "rexnet_100"),  # partial residuals (slice + add)
    ("timm", "nf_resnet26"),  # normalizer-free: timm's NormFreeBlock is a leaf module
    ("torchvision", "squeezenet1_0"),  # no residual: conv-block fallback
    ("torchvision", "shufflenet_v2_x0_5"),  # channel shuffle, no residual adds
]


@pytest.mark.parametrize("source,name", SLICE)
def test_sweep_slice(source: str, name: str) -> None:
    row = zoo_sweep.check_model(source, name, size=64)
    assert row["status"] in ("ok", "no sites"), row


def sweep(*args: str, timeout: float | None = 600) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "zoo_sweep.py"), *args], check=True, cwd=ROOT,
                   timeout=timeout)


def test_sweep_script_writes_report(tmp_path: Path) -> None:
    sweep("--source", "torchvision", "--filter", "resnet18", "--size", "64", "--out", str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["model"], r["status"]) for r in rows] == [("resnet18", "ok")]
    summary = (tmp_path / "summary.md").read_text()
    assert "| torchvision | CNN | 1 | 1 | 1 (100.00%) | 0 | 0 |" in summary
    structure = list(csv.DictReader((tmp_path / "structure.csv").open()))
    assert [(r["model"], r["residual_adds"], r["cnn_blocks"]) for r in structure] == [("resnet18", "8", "20")]


@pytest.mark.zoo
def test_whole_zoo(tmp_path: Path) -> None:
    sweep("--out", str(tmp_path), timeout=None)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    cnn = [r for r in rows if r["source"] == "timm" and zoo_sweep.is_cnn(r)]
    assert sum(r["status"] == "ok" for r in cnn) >= 0.99 * len(cnn)
    assert all(r["status"] in ("ok", "no sites") for r in rows if r["source"] == "torchvision")
