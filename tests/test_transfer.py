"""The transfer experiments: their statistics, run plan, gate movement and report (fast), and
both Fashion-MNIST runs end to end on tiny generated IDX files (the ``examples`` marker)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transfer
import transfer_report
from fashion_setup import residual_cnn
from transfer_data import task_datasets
from transfer_runs import chosen_mult, collect, run_plan, seed_plan, unit_key
from transfer_stats import gate_movement, paired

import retrofit

from .test_fashion_mnist import make_fashion

ROOT = Path(__file__).resolve().parents[1]
T_975_4 = 2.7764451051977987  # the t distribution's 97.5% quantile, 4 degrees of freedom


def test_paired_statistics_and_the_verdict() -> None:
    plain = {s: 0.80 for s in range(5)}
    up = paired({s: 0.80 + d for s, d in enumerate([0.0, 0.2, 0.1, 0.3, 0.4])}, plain)
    assert up is not None and up.seeds == (0, 1, 2, 3, 4) and up.n == 5
    sd = math.sqrt((0.04 + 0 + 0.01 + 0.01 + 0.04) / 4)
    assert up.mean == pytest.approx(0.2) and up.std == pytest.approx(sd)
    assert up.low == pytest.approx(0.2 - T_975_4 * sd / math.sqrt(5))  # 0.0037: above zero
    assert up.high == pytest.approx(0.2 + T_975_4 * sd / math.sqrt(5))
    assert (up.better, up.worse, up.verdict) == (4, 0, "pays")  # a tie counts as neither
    down = paired({s: 0.80 - d for s, d in enumerate([0.1, 0.2, 0.1, 0.3, 0.2])}, plain)
    assert down is not None and (down.worse, down.verdict) == (5, "hurts")
    mixed = paired({s: 0.80 + d for s, d in enumerate([0.1, -0.1, 0.2, -0.2, 0.05])}, plain)
    assert mixed is not None and (mixed.better, mixed.worse, mixed.verdict) == (3, 2, "noise")
    one = paired({0: 0.9, 7: 0.1}, plain)
    assert one is not None and one.seeds == (0,) and one.verdict == "too few seeds"
    assert one.to_dict()["low"] is None and math.isnan(one.low)
    assert paired({9: 0.5}, plain) is None


class _V:
    def __init__(self, name: str, plain: bool = False) -> None:
        self.name, self.label, self.plain = name, name.upper(), plain


def test_the_run_plan_chooses_the_attention_lr_on_the_first_seed() -> None:
    variants = [_V("plain", True), _V("se")]
    mults, seeds = (1.0, 10.0), (3, 4)
    assert unit_key(50, "se", 10.0, 3) == "target50/se/attn-lr-x10/seed3"
    assert unit_key(50, "plain", None, 3) == "target50/plain/default/seed3"
    first = seed_plan({}, 50, 3, variants, mults, seeds, "val_acc")
    assert [(v.name, m) for v, m in first] == [("plain", None), ("se", 1.0), ("se", 10.0)]
    with pytest.raises(RuntimeError, match="se, size 50: the first seed's choice of the attention lr is not made"):
        seed_plan({}, 50, 4, variants, mults, seeds, "val_acc")
    records = {unit_key(50, "plain", None, 3): {"seed": 3, "val_acc": 0.5},
               unit_key(50, "se", 1.0, 3): {"seed": 3, "val_acc": 0.7},
               unit_key(50, "se", 10.0, 3): {"seed": 3, "val_acc": 0.7}}
    assert chosen_mult(records, 50, "se", mults, 3, "val_acc") == 1.0  # a tie: the earlier
    records[unit_key(50, "se", 10.0, 3)] = {"seed": 3, "val_acc": 0.71}
    assert chosen_mult(records, 50, "se", mults, 3, "val_acc") == 10.0
    later = seed_plan(records, 50, 4, variants, mults, seeds, "val_acc")
    assert [(v.name, m) for v, m in later] == [("plain", None), ("se", 10.0)]
    records[unit_key(50, "se", 10.0, 4)] = {"seed": 4, "val_acc": 0.6}
    got = collect(records, sizes=[50], epochs=[3], seeds=seeds, mults=mults, variants=variants, score="val_acc")
    se = got["50"]["rows"]["se"]
    assert got["50"]["epochs"] == 3 and se["attn_lr_mult"] == 10.0
    assert se["selection"] == {"x1": 0.7, "x10": 0.71} and [u["seed"] for u in se["units"]] == [3, 4]


def test_processes_sharing_a_run_pass_over_the_units_another_holds() -> None:
    # Another process holds se's first-seed unit at x10 for one pass: this one goes on with
    # the units it can run (plain on both seeds), and runs se's later seed once the choice
    # exists, instead of waiting on the held unit.
    variants = [_V("plain", True), _V("se")]
    mults, seeds = (1.0, 10.0), (3, 4)
    records: dict[str, dict[str, Any]] = {}
    held = {unit_key(50, "se", 10.0, 3)}
    order: list[str] = []

    def start(size: int, v: Any, m: float | None, seed: int) -> dict[str, Any] | None:
        key = unit_key(size, v.name, m, seed)
        if key in records:
            return records[key]
        if key in held:  # held in the first pass; by the next the other process has stored it, x10 scoring higher
            held.discard(key)
            return None
        if key == unit_key(50, "se", 10.0, 3):
            records[key] = {"seed": seed, "val_acc": 0.9}
            return records[key]
        order.append(key)
        records[key] = {"seed": seed, "val_acc": 0.5}
        return records[key]

    run_plan(lambda: records, sizes=[50], seeds=seeds, variants=variants, mults=mults, score="val_acc",
             start=start, poll_seconds=0)
    assert order == ["target50/plain/default/seed3", "target50/se/attn-lr-x1/seed3",
                     "target50/plain/default/seed4", "target50/se/attn-lr-x10/seed4"]
    assert len(records) == 5 and not held


def test_a_run_takes_added_variants_and_refuses_other_settings() -> None:
    saved = transfer.settings_dict(transfer.Settings(variants=("plain", "se")))
    assert transfer.settings_differ(saved, dict(saved)) is None
    assert transfer.settings_differ(saved, {**saved, "variants": ["plain", "se", "ema"]}) is None
    assert transfer.settings_differ(saved, {**saved, "variants": ["plain"]}) == "variants without se"
    assert transfer.settings_differ(saved, {**saved, "seeds": [0], "lr": 0.1}) == "lr, seeds"


def test_gate_movement_is_zero_at_insertion_and_measures_what_moved() -> None:
    torch.manual_seed(0)
    images = torch.randn(6, 1, 28, 28)
    net = residual_cnn().eval()
    with torch.no_grad():  # a fresh timm ResNet's last norm of each branch is zero: so would be GC's input
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    se = retrofit.retrofit(net, "se", input_size=(1, 28, 28))
    gc = retrofit.retrofit(net, "gc", input_size=(1, 28, 28))
    for model, kind in ((se, "gate"), (gc, "added")):
        rows = gate_movement(model, images)
        assert len(rows) == 8 and {r["kind"] for r in rows} == {kind}
        assert all(r["mean"] == 0.0 and r["p95"] == 0.0 for r in rows)
    # SE: last layer zero with bias c gives the gate 2 sigmoid(c) everywhere: |g - 1| = tanh(c / 2)
    module = se.get_submodule("layer2.1.se")
    with torch.no_grad():
        module.fc2.bias.fill_(0.5)
    row = next(r for r in gate_movement(se, images) if r["module"] == "layer2.1.se")
    assert row["mean"] == pytest.approx(math.tanh(0.25), rel=1e-6) and row["p95"] == pytest.approx(math.tanh(0.25),
                                                                                                   rel=1e-6)
    # GC: a constant added term b per channel: ||delta|| / ||x|| = b sqrt(C H W) / ||x|| per image
    block = gc.get_submodule("layer3.0.gc")
    with torch.no_grad():
        block.mlp_add[-1].bias.fill_(0.3)
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        gc.eval()(images)
    handle.remove()
    x = seen[0]
    want = (0.3 * math.sqrt(x[0].numel()) / x.flatten(1).norm(dim=1)).double()
    row = next(r for r in gate_movement(gc, images) if r["module"] == "layer3.0.gc")
    assert row["mean"] == pytest.approx(float(want.mean()), rel=1e-5)
    assert row["p95"] == pytest.approx(float(torch.quantile(want, 0.95)), rel=1e-5)


def _unit(size: int, name: str, seed: int, acc: float, gate: str = "identity", moved: float = 0.0) -> dict[str, Any]:
    gates = None if name == "plain" else [{"module": "layer1.0.se", "path": "layer1.0", "attn": "se", "gate": gate,
                                           "channels": 16, "kind": "gate", "mean": moved, "p95": 2 * moved}]
    return {"key": unit_key(size, name, None if name == "plain" else 1.0, seed), "size": size, "variant": name,
            "seed": seed, "gate": gate, "attn_lr_mult": None if name == "plain" else 1.0,
            "params_added": 0 if name == "plain" else 1234, "test_acc": acc, "val_acc": acc,
            "equal_to_plain_at_insertion": None if name == "plain" else gate == "identity",
            "gates": gates, "gates_at_insertion": gates and [{**gates[0], "mean": 0.0, "p95": 0.0}],
            "seconds": 10.0, "cpu_seconds": 8.0}


def test_the_report_is_computed_from_the_units(tmp_path: Path) -> None:
    run = tmp_path / "classification"
    s = transfer.Settings(seeds=(0, 1, 2, 3, 4), sizes=(5,), epochs=(1,), attn_lr_mults=(1.0,),
                          variants=("plain", "se", "se-sigmoid"))
    (run / "units").mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps(transfer.settings_dict(s)))
    plain = [0.80, 0.81, 0.79, 0.80, 0.82]
    units = [_unit(5, "plain", k, a) for k, a in enumerate(plain)]
    up, down = [0.01, 0.012, 0.011, 0.009, 0.013], [0.02, 0.03, 0.025, 0.02, 0.03]
    units += [_unit(5, "se", k, a + d, moved=0.001) for k, (a, d) in enumerate(zip(plain, up, strict=True))]
    units += [_unit(5, "se-sigmoid", k, a - d, gate="sigmoid", moved=0.4)
              for k, (a, d) in enumerate(zip(plain, down, strict=True))]
    units.append({"key": "source", "task": "source", "train_images": 100, "epochs": 1, "test_acc": 0.9,
                  "seconds": 5.0})
    for u in units:
        (run / "units" / (u["key"].replace("/", "__") + ".json")).write_text(json.dumps(u))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{transfer_report.README_BEGIN}old{transfer_report.README_END}\nrest\n")
    page = tmp_path / "docs" / "transfer.md"
    assert transfer_report.main(["--classification", str(run), "--detection", str(tmp_path / "none"),
                                 "--page", str(page), "--figures", str(tmp_path / "docs" / "fig"),
                                 "--readme", str(readme)]) == 0
    text = page.read_text()
    assert "16 of 16 runs done (complete)." in text
    assert ("| SE, identity | 1,234 | ×1 | 5 of 5 seeds | 81.50 ± 1.25 | +1.10 [+0.90, +1.30] | 5 of 5 | pays | "
            r"\|g−1\| 0.001 (p95 ≤ 0.002) | 8 |") in text
    assert "| SE, sigmoid gates | 1,234 | ×1 | 0 of 5 seeds |" in text and "| 0 of 5 | hurts |" in text
    assert "- 5 images per class: Pays (the whole interval above zero): SE, identity (+1.10 [+0.90, +1.30] points, " \
           "better on 5 of 5 seeds)." in text
    assert "identity insertion equals plain fine-tuning's start, bit for bit, in 5 of 5 runs." in text
    assert "gates still within 0.01 of identity after training (carried along, not tested): SE, identity." in text
    assert "## Detection" in text and "No run yet." in text
    assert (tmp_path / "docs" / "fig" / "gates-classification.png").read_bytes()[:4] == b"\x89PNG"
    assert "![gate movement per site](fig/gates-classification.png)" in text
    summary = readme.read_text().split(transfer_report.README_BEGIN)[1].split(transfer_report.README_END)[0]
    assert "classification, 5 images per class: pays: SE, identity; hurts: SE, sigmoid gates; noise: none" in summary
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("\nrest\n")
    res = json.loads((run / "results.json").read_text())
    assert res["summary"]["5"]["se"]["paired"]["verdict"] == "pays"
    res["summary"]["50"] = {n: {**r, "paired": None} for n, r in res["summary"]["5"].items()}  # a size not run yet
    assert "; classification, 50 images per class: not run yet." in transfer_report.summary_line([res])
    for r in res["summary"]["5"].values():  # every interval holding zero
        if r["paired"]:
            r["paired"]["verdict"] = "noise"
    assert "classification, 5 images per class: none pays or hurts (2 variants, every interval holds zero); " \
        "classification, 50" in transfer_report.summary_line([res])


# --------------------------------------------------------------------------- end to end


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


@pytest.mark.examples
def test_classification_transfer_end_to_end(tmp_path: Path) -> None:
    """examples/transfer.py on a tiny generated Fashion-MNIST: the source model, both target
    sizes, the lr chosen on the first seed, identity equal to plain at insertion, --resume."""
    root = make_fashion(tmp_path / "fm", n_train=300, n_test=100)
    out = tmp_path / "out"
    cmd = ["examples/transfer.py", "--data-root", str(root), "--out", str(out), "--work", str(tmp_path / "work"),
           "--seeds", "0", "1", "--sizes", "4", "8", "--epochs", "1", "1", "--val-per-class", "4",
           "--source-epochs", "1", "--train-limit", "10", "--variants", "plain", "se", "--grid-lr", "1", "10"]
    r = _run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["source"]["train_images"] == 50 and len(list((out / "units").glob("*.json"))) == 11
    for size in ("4", "8"):
        rows = res["sizes"][size]["rows"]
        plain, se = rows["plain"]["units"], rows["se"]["units"]
        assert [u["seed"] for u in plain] == [u["seed"] for u in se] == [0, 1]
        assert se[0]["train_images"] == 5 * int(size) and se[0]["test_images"] == 50
        assert all(u["equal_to_plain_at_insertion"] for u in se)
        assert [u["acc_at_insertion"] for u in se] == [u["acc_at_insertion"] for u in plain]
        assert rows["se"]["attn_lr_mult"] in (1.0, 10.0) and set(rows["se"]["selection"]) == {"x1", "x10"}
        assert all(u["attn_lr_mult"] == rows["se"]["attn_lr_mult"] for u in se)
        assert all(g["kind"] == "gate" and g["mean"] == 0.0 for u in se for g in u["gates_at_insertion"])
    # at insertion means before any step: the source model with the seed's new head
    data = task_datasets("target", per_class=4, val_per_class=4, root=root, augment=False)
    for u in res["sizes"]["4"]["rows"]["plain"]["units"]:
        start = transfer.with_new_head(transfer.load_source(tmp_path / "work" / "source.safetensors"), 5, u["seed"])
        assert u["val_acc_at_insertion"] == transfer.accuracy(transfer.logits(start, data.val), data.val.tensors[1])
    r = _run(cmd)
    assert r.returncode == 2 and "pass --resume" in r.stderr
    r = _run([*cmd, "--resume"])
    assert r.returncode == 0 and " ..." not in r.stdout
    r = _run([*cmd[:-2], "1", "--resume"])  # another grid: other settings
    assert r.returncode == 2 and "written with other settings (attn_lr_mults)" in r.stderr


@pytest.mark.examples
def test_detection_transfer_end_to_end(tmp_path: Path) -> None:
    """examples/yolo_transfer.py on a few canvases: the source YOLOv8n, both target sizes,
    identity GC starting bit for bit where plain starts, the report page."""
    fm = make_fashion(tmp_path / "fm", n_train=120, n_test=60)
    out = tmp_path / "out"
    r = _run(["examples/yolo_transfer.py", "--out", str(out), "--runs", str(tmp_path / "runs"), "--fashion-mnist",
              str(fm), "--seeds", "0", "1", "--sizes", "4", "8", "--epochs", "1", "1", "--val", "4", "--test", "4",
              "--source-train", "8", "--source-val", "4", "--source-test", "4", "--source-epochs", "1",
              "--canvas", "64", "--imgsz", "64", "--batch", "4", "--grid-lr", "1", "--gate-images", "4",
              "--variants", "plain", "gc-backbone"])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["source"]["train_canvases"] == 8 and "left_out" in res
    for size in ("4", "8"):
        rows = res["sizes"][size]["rows"]
        gc = rows["gc-backbone"]["units"]
        assert [u["seed"] for u in gc] == [0, 1] and all(u["equal_to_plain_at_insertion"] for u in gc)
        assert all(u["params_added"] == 199 + 653 + 2_329 + 8_753 for u in gc)
        assert [u["map_val_at_insertion"] for u in gc] == [u["map_val_at_insertion"] for u in rows["plain"]["units"]]
        assert all(len(u["gates"]) == 4 and u["gates"][0]["kind"] == "added" for u in gc)
    train4 = sorted((tmp_path / "runs" / "data" / "target" / "images" / "train4").glob("*.png"))
    assert [p.name for p in train4] == [f"{k:05d}.png" for k in range(4)]
    page, readme = tmp_path / "transfer.md", tmp_path / "README.md"
    readme.write_text(f"{transfer_report.README_BEGIN}{transfer_report.README_END}\n")
    r = _run(["examples/transfer_report.py", "--classification", str(tmp_path / "none"), "--detection", str(out),
              "--page", str(page), "--figures", str(tmp_path / "fig"), "--readme", str(readme)])
    assert r.returncode == 0, r.stderr[-3000:]
    text = page.read_text()
    assert "## Detection: YOLOv8n" in text and "| (c) global context after the backbone stages, identity | 11,934 |" \
        in text
    # a verdict per size, whichever way a tiny run falls
    assert re.search(r"detection, 4 training canvases: (pays:|none pays or hurts)", readme.read_text())
