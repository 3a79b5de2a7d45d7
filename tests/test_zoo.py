"""The zoo sweep: a representative slice by default, the whole zoo with ``pytest -m zoo``."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.examples  # the sweep script on a slice, as CI's examples run (keeps the default run short)
@pytest.mark.parametrize("keep_class", [False, True], ids=["graph-module", "keep-class"])
@pytest.mark.parametrize("source,name", SLICE)
def test_sweep_slice(source: str, name: str, keep_class: bool) -> None:
    row = zoo_sweep.check_model(source, name, size=64, keep_class=keep_class)
    assert row["status"] in ("ok", "no sites"), row
    if keep_class and row["status"] == "ok" and name == "resnet18":
        assert (row["kc_units"], row["kc_adds"], row["kc_adds_in_block"], row["kc_out_of_reach"]) == (8, 8, 8, 0)


@pytest.mark.parametrize("name,sites", [("test_vit", 1), ("test_coatnet", 8)])
def test_fixed_size_model_is_checked_at_a_smaller_size(name: str, sites: int) -> None:
    # Both are made for a fixed 160-pixel input; built with img_size=64 their layers with
    # sites (a ViT's patch embedding, CoAtNet's MBConv blocks) are the same.
    row = zoo_sweep.real_check("timm", name, 64, batch=1, shrink=True)
    assert (row["status"], row["input_size"], row["se_sites"]) == ("ok", "3x64x64 (img_size=64)", sites)
    native = zoo_sweep.real_check("timm", name, 64, batch=1)
    assert (native["input_size"], native["se_sites"], native["se_added"]) == ("3x160x160", sites, row["se_added"])


def test_frozen_check_still_reaches_new_parameters() -> None:
    row = zoo_sweep.real_check("timm", "test_resnet", 64, batch=1, frozen=True)
    assert row["status"] == "ok" and row["se_sites"] > 0, row


def test_a_pass_can_check_fewer_attention_types(tmp_path: Path) -> None:
    row = zoo_sweep.real_check("timm", "test_resnet", 64, batch=1, keep_class=True, attns=("se",))
    assert row["status"] == "ok" and row["se_sites"] > 0 and row["kc_units"] > 0 and "eca_sites" not in row
    with pytest.raises(SystemExit):
        zoo_sweep.main(["--keep-class", "--attn", "eca", "--summary-only", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_model_too_big_for_memory_is_skipped_with_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo_sweep, "_memory_bytes", lambda: 2**30)
    row = zoo_sweep.real_check("timm", "resnet50", 64)
    assert row["status"] == "skipped"
    assert row["reason"] == "needs about 1 GiB for 0.03B parameters; this machine has 1 GiB"


def test_fingerprint_sees_any_changed_tensor() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    before = zoo_sweep._fingerprint(model)
    assert zoo_sweep._fingerprint(model) == before
    with torch.no_grad():
        model[1].running_var[2] = torch.nextafter(model[1].running_var[2], torch.tensor(2.0))
    assert zoo_sweep._fingerprint(model) != before


def sweep(*args: str, timeout: float | None = 600) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "zoo_sweep.py"), *args], check=True, cwd=ROOT,
                   timeout=timeout)


@pytest.mark.examples
def test_sweep_script_writes_report(tmp_path: Path) -> None:
    sweep("--source", "torchvision", "--filter", "resnet18", "--size", "64", "--out", str(tmp_path))
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["model"], r["status"]) for r in rows] == [("resnet18", "ok")]
    summary = (tmp_path / "summary.md").read_text()
    assert "| torchvision | CNN | 1 | 1 | 1 (100.00%) | 0 | 0 | 0 |" in summary
    structure = list(csv.DictReader((tmp_path / "structure.csv").open()))
    assert [(r["model"], r["residual_adds"], r["cnn_blocks"]) for r in structure] == [("resnet18", "8", "20")]
    # --redo sweeps a finished model again; results.csv keeps one row per model.
    (tmp_path / "summary.md").unlink()
    sweep("--source", "torchvision", "--filter", "resnet18", "--size", "64", "--out", str(tmp_path), "--resume",
          "--redo", "resnet18")
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["model"], r["status"]) for r in rows] == [("resnet18", "ok")]
    assert "| torchvision | CNN | 1 | 1 | 1 (100.00%) | 0 | 0 | 0 |" in (tmp_path / "summary.md").read_text()
    # Compacting results.csv keeps the rows of models outside --filter.
    sweep("--source", "torchvision", "--filter", "alexnet", "--out", str(tmp_path), "--summary-only")
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(r["model"], r["status"]) for r in rows] == [("resnet18", "ok")]


@pytest.mark.zoo
def test_whole_zoo(tmp_path: Path) -> None:
    sweep("--out", str(tmp_path), timeout=None)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    cnn = [r for r in rows if r["source"] == "timm" and zoo_sweep.is_cnn(r)]
    assert sum(r["status"] == "ok" for r in cnn) >= 0.99 * len(cnn)
    assert all(r["status"] in ("ok", "no sites") for r in rows if r["source"] == "torchvision")
