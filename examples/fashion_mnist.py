"""Real-data evidence on Fashion-MNIST: what attention is worth, from scratch and retrofitted.

    python examples/fashion_mnist.py --quick             # smoke run, a few minutes -> docs/fashion-mnist/quick/
    python examples/fashion_mnist.py --resume            # the full run, hours on 2 CPU cores -> docs/fashion-mnist/

Data: Fashion-MNIST (60,000 training / 10,000 test images, 28x28 grey), read from its IDX
files: Debian's package `dataset-fashion-mnist` or `--data-root DIR`.

Experiment 1, the small-CNN lab, from scratch: the lab's baseline (two conv layers with 32
and 64 filters, kernel 3, padding 1, each conv -> max-pool -> ReLU, then one linear layer);
"+SE": `retrofit()` of the same network before training, SE after each conv block with
the paper's sigmoid gate (and, as a control, with retrofit's identity gate); "+self-
attention": retrofit's channel self-attention (`chsa`, built on nn.MultiheadAttention,
channels as tokens) on the same sites. Every row starts from the same weights for the
layers they share, and gets the same optimizer, schedule and data order. It trains on all
60,000 training images; the test accuracy after each epoch is recorded, never used to
choose anything, and the last epoch's is reported.

Experiment 2, the product's use: a residual CNN (timm's resnet18 narrowed to 16-32-64-128
channels, with a 3x3 stride-2 stem and no max-pool for 28x28 inputs; 8 residual blocks) is
pretrained on 54,000 training images; 6,000 are held out for validation. Then every
contender gets the same extra budget from the same weights: the baseline trained on, each
attention type inserted with identity gates, and SE / ECA / CBAM with the papers' sigmoid
gates at random init. The attention learning rate and the attention-only warm-up are
chosen per contender on the validation split (first seed only; the other seeds use the
choice), never on the test split. The same contenders also fine-tune on 10% of the
training images (the low-data run, with the configuration chosen on full data).

Every run is a unit with its own JSON file under OUT/units/; `--resume` skips the units
that exist, so a stopped run continues where it was. Several processes can share one run
(each claims the next unit nobody holds), e.g. on 2 cores:
`--resume --only lab --threads 1` beside `--resume --only retrofit --threads 1`, and more
`--only retrofit` processes where there are more cores. After every unit the script rewrites
OUT/results.json, results.md, curves.png and the gate plots from the units that exist
(partial results say so). Base weights are kept in --work (the full run's are committed, so
a resume from a fresh clone keeps the units built on them); a resumed run that lacks them
trains the base again and drops the units that depended on the old one.

Beside it in examples/: example_data.py (the data), jobs.py (the units, claims and resume)
and fashion_setup.py (the settings, the residual CNN and the training that placement.py
shares).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import retrofit  # noqa: E402
from retrofit.errors import RetrofitError  # noqa: E402
from retrofit.gates import GateRecord, SiteGates, plot_gates, record_gates  # noqa: E402

# isort: split
# Siblings in examples/ (first on sys.path): the data, what placement.py shares, the job runner.
from example_data import FASHION_MNIST_CLASSES, fashion_mnist_datasets  # noqa: E402
from fashion_setup import (  # noqa: E402
    FULL,
    INPUT,
    QUICK,
    Settings,
    accuracy,
    base_unit,
    config,
    delta,
    limited,
    load_base,
    logits_of,
    pct,
    stack,
    train,
)
from jobs import Units, continue_args, file_digest  # noqa: E402

DEBIAN_README = Path("/usr/share/doc/dataset-fashion-mnist/README.md.gz")
LAB_ROWS = ("baseline", "se", "se-identity", "self-attention")
# The lab's expected results (15 epochs), as the lab states them.
LAB_EXPECTED = {"baseline": "about 70%", "se": "+1 point", "self-attention": "-3 points"}
GATE_PLOT_ROWS = ("se-identity", "se-sigmoid")


class LabCNN(nn.Module):
    """The lab's baseline: two conv layers (32 and 64 filters, kernel 3, padding 1), each
    conv -> max-pool -> ReLU, then one linear layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(64 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.pool1(self.conv1(x)))
        x = self.relu2(self.pool2(self.conv2(x)))
        return self.fc(x.flatten(1))


# --------------------------------------------------------------------------- gate values


def gate_values(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[dict[str, Any]] | None:
    """Mean channel gate per class of every site with a channel gate (for the gate plots)."""
    record = record_gates(model, images, labels, classes=FASHION_MNIST_CLASSES, batch_size=1000)
    if not record.sites:
        return None
    return [{"module": s.module, "path": s.path, "attn": s.attn, "gate": s.gate, "method": s.method,
             "size": list(s.size),
             "per_class": [[round(v, 5) for v in row] for row in record.per_class(s.module).tolist()]}
            for s in record.sites]


# --------------------------------------------------------------------------- experiment 1


def lab_unit(row: str, seed: int, s: Settings, data: Any) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = LabCNN()
    torch.manual_seed(1000 + seed)  # the attention modules' own init
    if row == "baseline":
        model = base
    else:
        attn, gate = {"se": ("se", "sigmoid"), "se-identity": ("se", "identity"),
                      "self-attention": ("chsa", "identity")}[row]
        model = retrofit.retrofit(base, attn, gate=gate, input_size=INPUT)
    params = sum(p.numel() for p in model.parameters())
    test = data.test
    hist = train(model, data.train, test, config(s, seed, epochs=s.lab_epochs, lr=s.lab_lr, attn_lr=s.lab_lr,
                                                 warmup_epochs=1.0))
    return {"name": row, "seed": seed, "params": params, "train_images": len(data.train),
            "test_acc": hist[-1]["val_acc"],
            "curve": [h["val_acc"] for h in hist], "train_loss": [h["train_loss"] for h in hist],
            "epoch_s": [round(h["time_s"], 2) for h in hist]}


# --------------------------------------------------------------------------- experiment 2


def contenders(s: Settings) -> list[tuple[str, str | None, str | None]]:
    """(row name, attention, gate); attention None is the baseline trained on."""
    rows: list[tuple[str, str | None, str | None]] = [("baseline-continued", None, None)]
    rows += [(f"{a}-identity", a, "identity") for a in s.attns]
    rows += [(f"{a}-sigmoid", a, "sigmoid") for a in s.sigmoid_attns]
    return rows


def grid_name(mult: float, attn_only: int) -> str:
    return f"attn-lr-x{mult:g}_attn-only-{attn_only}"


def retrofit_unit(row: tuple[str, str | None, str | None], seed: int, grid: tuple[float, int], epochs: int,
                  s: Settings, data: Any, base: nn.Module, record_gate_values: bool) -> dict[str, Any]:
    name, attn, gate = row
    mult, attn_only = grid
    (test_x, test_y), (val_x, val_y) = stack(data.test), stack(data.val)
    base_logits = logits_of(base, test_x)
    torch.manual_seed(1000 + seed)  # the sigmoid gates' random init
    if attn is None:
        model, added = copy.deepcopy(base), 0
    else:
        model = retrofit.retrofit(base, attn, gate=gate, input_size=INPUT)
        added = retrofit.get_report(model).params_added
    at_insertion = logits_of(model, test_x)
    if gate != "sigmoid" and not torch.equal(at_insertion, base_logits):
        raise AssertionError(f"{name}: inserting identity gates changed the test logits")
    val_at_insertion = accuracy(logits_of(model, val_x), val_y)
    cfg = config(s, seed, epochs=epochs, lr=s.lr, attn_lr=mult * s.lr, attn_only_epochs=attn_only if attn else 0,
                 warmup_epochs=0.5)
    hist = train(model, data.train, data.val, cfg)
    out: dict[str, Any] = {
        "name": name, "attn": attn, "gate": gate, "seed": seed, "attn_lr_mult": mult if attn else None,
        "attn_only_epochs": attn_only if attn else None, "params_added": added,
        "acc_at_insertion": accuracy(at_insertion, test_y), "test_acc": accuracy(logits_of(model, test_x), test_y),
        "val_acc": hist[-1]["val_acc"], "val_curve": [val_at_insertion] + [h["val_acc"] for h in hist],
        "train_loss": [h["train_loss"] for h in hist], "epoch_s": [round(h["time_s"], 2) for h in hist],
        "train_images": len(data.train),
    }
    if record_gate_values and attn is not None:
        out["gates"] = gate_values(model, test_x, test_y)
    return out


# --------------------------------------------------------------------------- the run


class Runner:
    """Runs the units that do not exist yet, in a fixed order, rewriting the report after each."""

    def __init__(self, s: Settings, out: Path, work: Path, data_root: str | None, command: str) -> None:
        self.s, self.out, self.work, self.data_root, self.command = s, out, work, data_root, command
        self.units = Units(out)
        self._data: dict[str, Any] = {}

    def data(self, kind: str) -> Any:
        if kind not in self._data:
            s = self.s
            if kind == "lab":
                d = fashion_mnist_datasets(self.data_root, val_size=0, augment=False)
            elif kind == "full":
                d = fashion_mnist_datasets(self.data_root, val_size=s.val_size)
            else:
                d = fashion_mnist_datasets(self.data_root, val_size=s.val_size, train_fraction=s.low_fraction)
            self._data[kind] = limited(d, s.train_limit if kind != "low" else None)
        return self._data[kind]

    def unit(self, key: str, make: Any, wait: bool = True) -> dict[str, Any] | None:
        return self.units.run(key, make, lambda: write_report(self.out, self.s, self.units.all(), self.command),
                              wait=wait)

    def base(self, seed: int) -> nn.Module:
        """The pretrained residual CNN of one seed: trained once, its weights kept in --work."""
        self.train_base(seed, wait=True)
        return load_base(self.work / f"base-seed{seed}.safetensors")

    def train_base(self, seed: int, wait: bool) -> bool:
        """Make sure the base of ``seed`` exists; False when ``wait`` is False and another
        process is training it."""
        key, weights = f"retrofit/base/seed{seed}", self.work / f"base-seed{seed}.safetensors"
        old = self.units.get(key)
        if old is not None and not weights.is_file():
            print(f"{key}: weights {weights} missing; training the base again", flush=True)
            self.units.path(key).unlink()

        def make() -> dict[str, Any]:
            return {**base_unit(seed, self.s, self.data("full"), weights), "weights_sha256": file_digest(weights)}

        new = self.unit(key, make, wait=wait)
        if new is None:
            return False
        if old is not None and new["weights_sha256"] != old["weights_sha256"]:
            dropped = [k for k in self.units.all() if k.startswith("retrofit/") and k.endswith(f"/seed{seed}")
                       and k != key]
            for k in dropped:
                self.units.path(k).unlink()
            print(f"  the new base differs from the old one: dropped {len(dropped)} unit(s) built on it", flush=True)
        return True

    def run(self, parts: tuple[str, ...]) -> None:
        s = self.s
        # Units another process holds are skipped (wait=False); a unit that later ones need
        # (a base, the first seed's selection runs) is waited for.
        if "lab" in parts:
            for seed in s.seeds:
                for row in LAB_ROWS:
                    self.unit(f"lab/{row}/seed{seed}", lambda row=row, seed=seed: lab_unit(row, seed, s, self.data("lab")),
                              wait=False)
        if "retrofit" not in parts:
            return
        rows = contenders(s)
        first = s.seeds[0]
        for i, seed in enumerate(s.seeds):
            if seed != first:
                # Train the bases nobody holds before waiting for one another process trains,
                # so that two processes train two bases side by side.
                for later in s.seeds[i:]:
                    self.train_base(later, wait=False)
            base = self.base(seed)
            # The first seed runs every contender at one grid point before the next, so
            # that a run stopped part-way compares them all.
            if seed == first:
                plan = [(row, (1.0, 0)) for row in rows if row[1] is None]
                plan += [(row, g) for g in s.grid() for row in rows if row[1] is not None]
            else:
                plan = [(row, (1.0, 0) if row[1] is None else chosen(self.units, row[0], s)) for row in rows]
            for wait in ((False, True) if seed == first else (False,)):
                for row, g in plan:
                    key = unit_key("full", row[0], g if row[1] else None, seed)
                    self.unit(key, lambda row=row, g=g, seed=seed, base=base: retrofit_unit(
                        row, seed, g, s.epochs, s, self.data("full"), base,
                        record_gate_values=seed == first and row[0] in GATE_PLOT_ROWS), wait=wait)
        for seed in s.seeds:
            base = self.base(seed)
            for row in rows:
                g = (1.0, 0) if row[1] is None else chosen(self.units, row[0], s)
                self.unit(unit_key("low", row[0], g if row[1] else None, seed),
                          lambda row=row, g=g, seed=seed, base=base: retrofit_unit(
                              row, seed, g, s.low_epochs, s, self.data("low"), base, record_gate_values=False),
                          wait=False)


def unit_key(regime: str, row: str, grid: tuple[float, int] | None, seed: int) -> str:
    return f"retrofit/{regime}/{row}/{grid_name(*grid) if grid else 'default'}/seed{seed}"


def chosen(units: Units | dict[str, dict[str, Any]], row: str, s: Settings) -> tuple[float, int]:
    """The grid point with the best final validation accuracy on the first seed (ties: the
    earlier grid point)."""
    records = units.all() if isinstance(units, Units) else units
    scores = []
    for g in s.grid():
        r = records.get(unit_key("full", row, g, s.seeds[0]))
        if r is None:
            raise RuntimeError(f"{row}: selection unit {grid_name(*g)} of seed {s.seeds[0]} has not run")
        scores.append((r["val_acc"], g))
    best = max(v for v, _ in scores)
    return next(g for v, g in scores if v == best)


# --------------------------------------------------------------------------- report


def per_seed(records: dict[str, dict[str, Any]], key_of: Any, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    return [r for r in (records.get(key_of(seed)) for seed in seeds) if r is not None]


def collect(s: Settings, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """results.json, from the units that exist."""
    lab_rows = []
    for row in LAB_ROWS:
        got = per_seed(records, lambda seed, row=row: f"lab/{row}/seed{seed}", s.seeds)
        if got:
            lab_rows.append({"name": row, "params": got[0]["params"], "train_images": got[0]["train_images"],
                             "seeds": [r["seed"] for r in got],
                             "test_acc": [r["test_acc"] for r in got], "curves": [r["curve"] for r in got],
                             "epoch_s": statistics.fmean(statistics.fmean(r["epoch_s"]) for r in got)})
    bases = per_seed(records, lambda seed: f"retrofit/base/seed{seed}", s.seeds)
    out: dict[str, Any] = {
        "lab": {"epochs": s.lab_epochs, "rows": lab_rows},
        "retrofit": {"epochs": s.epochs, "baseline_acc": [b["test_acc"] for b in bases],
                     "baseline_seeds": [b["seed"] for b in bases], "base": bases and {
                         "params": bases[0]["params"], "epochs": s.base_epochs,
                         "val_acc": [b["val_acc"] for b in bases], "curves": [b["curve"] for b in bases],
                         "epoch_s": statistics.fmean(statistics.fmean(b["epoch_s"]) for b in bases)},
                     "selection": {}, "rows": []},
        "retrofit_low_data": {"epochs": s.low_epochs, "train_fraction": s.low_fraction, "rows": []},
    }
    for name, attn, _gate in contenders(s):
        if attn is not None:
            grid = {grid_name(*g): records[k]["val_acc"] for g in s.grid()
                    if (k := unit_key("full", name, g, s.seeds[0])) in records}
            if grid:
                try:
                    pick = grid_name(*chosen(records, name, s))
                except RuntimeError:
                    pick = None
                out["retrofit"]["selection"][name] = {"val_acc": grid, "chosen": pick}
        for regime, section in (("full", "retrofit"), ("low", "retrofit_low_data")):
            try:
                g = None if attn is None else chosen(records, name, s)
            except RuntimeError:
                continue
            got = per_seed(records, lambda seed, g=g, regime=regime, name=name: unit_key(regime, name, g, seed),
                           s.seeds)
            if not got:
                continue
            out[section]["rows"].append({
                "name": name, "attn": attn, "params_added": got[0]["params_added"],
                "config": None if g is None else grid_name(*g), "seeds": [r["seed"] for r in got],
                "acc_at_insertion": [r["acc_at_insertion"] for r in got], "test_acc": [r["test_acc"] for r in got],
                "val_acc": [r["val_acc"] for r in got], "val_curves": [r["val_curve"] for r in got],
                "train_images": got[0]["train_images"],
                "epoch_s": statistics.fmean(statistics.fmean(r["epoch_s"]) for r in got),
            })
    # Every run of the first seed, each grid point: what the selection saw, and the test
    # accuracy beside it (reported, never used to choose).
    for name, attn, _gate in contenders(s):
        for g in ([None] if attn is None else s.grid()):
            r = records.get(unit_key("full", name, g, s.seeds[0]))
            if r is not None:
                out["retrofit"].setdefault("first_seed_runs", []).append({
                    "name": name, "config": None if g is None else grid_name(*g),
                    "acc_at_insertion": r["acc_at_insertion"], "val_acc": r["val_acc"], "test_acc": r["test_acc"]})
    expected = len(s.seeds) * (len(LAB_ROWS) + 1 + 2 * len(contenders(s))) + (len(s.grid()) - 1) * (
        len(contenders(s)) - 1)
    out["complete"] = len(records) >= expected
    out["units"] = {"done": len(records), "total": expected}
    out["seconds"] = round(sum(r.get("seconds", 0.0) for r in records.values()), 1)
    out["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in s.__dict__.items()}
    out["settings"].update({
        "lab_model": "LabCNN (examples/fashion_mnist.py)", "residual_model": "timm resnet18, channels 16-32-64-128, "
        "3x3 stride-2 stem, no stem max-pool", "optimizer": "SGD, Nesterov momentum 0.9, linear warm-up + cosine "
        "(retrofit.finetune.fit)", "versions": {"torch": torch.__version__, "timm": timm.__version__,
                                                "retrofit": retrofit.__version__}})
    return out


def published_table() -> list[str]:
    """The 2-conv and ResNet rows of the benchmark table in the data set's own README."""
    if not DEBIAN_README.is_file():
        return [f"(the data set's README, {DEBIAN_README}, is not installed here)"]
    lines = ["| classifier (Fashion-MNIST README) | preprocessing | test accuracy |", "| --- | --- | ---: |"]
    for line in gzip.decompress(DEBIAN_README.read_bytes()).decode("utf-8", "replace").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.match(r"(2 Conv|ResNet18|Human Performance)", cells[0]):
            lines.append(f"| {cells[0]} | {cells[1]} | {cells[2]} |")
    return lines


def tables(res: dict[str, Any]) -> dict[str, str]:
    lab = res["lab"]["rows"]
    base = next((r for r in lab if r["name"] == "baseline"), None)
    t_lab = ["| model | params | test acc (%) | Δ vs baseline (points) | s / epoch | the lab expected |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in lab:
        d = "–" if base is None or r is base else delta(r["test_acc"], base["test_acc"])
        t_lab.append(f"| {r['name']} | {r['params']:,} | {pct(r['test_acc'])} | {d} | {r['epoch_s']:.1f} | "
                     f"{LAB_EXPECTED.get(r['name'], '–')} |")
    out = {"lab": "\n".join(t_lab)}
    rf = res["retrofit"]
    for section, title in (("retrofit", "full"), ("retrofit_low_data", "low")):
        rows = res[section]["rows"]
        cont = next((r for r in rows if r["name"] == "baseline-continued"), None)
        t = ["| model | params added | attention lr, warm-up (chosen on val) | test acc at insertion (%) | "
             "test acc after (%) | Δ vs baseline continued (points) | s / epoch |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        if title == "full" and rf["baseline_acc"]:
            t.append(f"| pretrained baseline ({rf['base']['epochs']} epochs) | 0 | – | – | {pct(rf['baseline_acc'])} "
                     f"| – | {rf['base']['epoch_s']:.1f} |")
        for r in rows:
            d = "–" if cont is None or r is cont else delta(r["test_acc"], cont["test_acc"])
            cfg = "–" if r["config"] is None else r["config"].replace("attn-lr-x", "×").replace("_attn-only-", ", ") + " ep"
            ins = "–" if r["attn"] is None else pct(r["acc_at_insertion"])
            t.append(f"| {r['name']} | {r['params_added']:,} | {cfg} | {ins} | {pct(r['test_acc'])} | {d} | "
                     f"{r['epoch_s']:.1f} |")
        out[title] = "\n".join(t)
    sel = rf["selection"]
    grids = list(dict.fromkeys(g for v in sel.values() for g in v["val_acc"]))
    t_sel = ["| model | " + " | ".join(grids) + " | chosen |", "| --- |" + " ---: |" * len(grids) + " --- |"]
    for name, v in sel.items():
        t_sel.append(f"| {name} | " + " | ".join(f"{100 * v['val_acc'][g]:.2f}" if g in v["val_acc"] else "–"
                                                 for g in grids) + f" | {v['chosen'] or '(pending)'} |")
    out["selection"] = "\n".join(t_sel)
    t_first = ["| model | attention lr, warm-up | test acc at insertion (%) | val acc after (%) | test acc after (%) |",
               "| --- | --- | ---: | ---: | ---: |"]
    for r in rf.get("first_seed_runs", []):
        cfg = "–" if r["config"] is None else r["config"].replace("attn-lr-x", "×").replace("_attn-only-", ", ") + " ep"
        t_first.append(f"| {r['name']} | {cfg} | {100 * r['acc_at_insertion']:.2f} | {100 * r['val_acc']:.2f} | "
                       f"{100 * r['test_acc']:.2f} |")
    out["first_seed"] = "\n".join(t_first)
    out["per_seed"] = "\n".join(
        ["| run | model | " + " | ".join(f"seed {sd}" for sd in res["settings"]["seeds"]) + " |",
         "| --- | --- |" + " ---: |" * len(res["settings"]["seeds"])]
        + [f"| lab | {r['name']} | " + " | ".join(f"{100 * a:.2f}" for a in r["test_acc"]) + " |" for r in lab]
        + (["| retrofit | pretrained baseline | " + " | ".join(f"{100 * a:.2f}" for a in rf["baseline_acc"]) + " |"]
           if rf["baseline_acc"] else [])
        + [f"| {'retrofit' if sec == 'retrofit' else 'low data'} | {r['name']} | "
           + " | ".join(f"{100 * a:.2f}" for a in r["test_acc"]) + " |"
           for sec in ("retrofit", "retrofit_low_data") for r in res[sec]["rows"]])
    return out


def images(rows: list[dict[str, Any]], on: str = " on ") -> str:
    return f"{on}{rows[0]['train_images']:,} images" if rows else ""


def write_report(out: Path, s: Settings, records: dict[str, dict[str, Any]], command: str) -> None:
    res = collect(s, records)
    t = tables(res)
    status = ("complete" if res["complete"] else
              f"**partial**: {res['units']['done']} of {res['units']['total']} runs done; "
              f"`{command} --resume` continues")
    md = [
        "# Fashion-MNIST: attention from scratch and retrofitted",
        "",
        f"Command: `{command}`; {res['seconds'] / 3600:.2f} h of run time in all ({status}). "
        f"Written by examples/fashion_mnist.py; nothing here is typed by hand.",
        "",
        f"Test accuracy on the 10,000 test images (one image = 0.01 points), mean ± std over seeds "
        f"{list(s.seeds)}; Δ is the paired difference per seed.",
        "",
        f"## Experiment 1: the lab, from scratch ({s.lab_epochs} epochs{images(res['lab']['rows'])}, SGD peak lr "
        f"{s.lab_lr}, batch {s.batch_size}, warm-up + cosine, no augmentation)",
        "",
        t["lab"],
        "",
        "Published results for comparable networks (the data set's README; not checked by its authors):",
        "",
        *published_table(),
        "",
        f"## Experiment 2: retrofitting a trained residual CNN ({s.base_epochs} epochs of pretraining, then "
        f"{s.epochs} extra epochs{images(res['retrofit']['rows'])}, fine-tuning peak lr {s.lr})",
        "",
        t["full"],
        "",
        f"Attention learning rate (× the fine-tuning lr) and attention-only warm-up epochs, chosen per model by the "
        f"final validation accuracy (%) on the {s.val_size:,} held-out training images, seed {s.seeds[0]}:",
        "",
        t["selection"],
        "",
        f"## Experiment 2, low data: {s.low_epochs} extra epochs on {100 * s.low_fraction:g}% of the training "
        f"images{images(res['retrofit_low_data']['rows'], ' (') + ')' if res['retrofit_low_data']['rows'] else ''}, "
        "from the same pretrained weights",
        "",
        t["low"],
        "",
        f"## Every run of seed {s.seeds[0]}, at each grid point (the test accuracy is reported, never used to "
        "choose)",
        "",
        t["first_seed"],
        "",
        "## Every seed (test accuracy, %)",
        "",
        t["per_seed"],
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot_curves(res, out / "curves.png")
    for name in GATE_PLOT_ROWS:
        plot_gate_unit(s, records, name, out / f"gates_{name}.png")


def plot_curves(res: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    cmap = plt.get_cmap("tab20")

    def band(ax: Any, curves: list[list[float]], label: str, color: Any, start: int) -> None:
        c = torch.tensor(curves) * 100
        x = range(start, start + c.shape[1])
        m, sd = c.mean(0), c.std(0, correction=0)
        ax.plot(x, m, label=label, color=color, marker="o", ms=2.5, lw=1.2)
        ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.12)

    for i, r in enumerate(res["lab"]["rows"]):
        band(axes[0], r["curves"], r["name"], "black" if r["name"] == "baseline" else cmap(2 * i), 1)
    axes[0].set(title="lab, from scratch: test accuracy per epoch", xlabel="epoch", ylabel="test accuracy (%)")
    for ax, section, title in ((axes[1], "retrofit", "retrofit, full data"),
                               (axes[2], "retrofit_low_data", "retrofit, low data")):
        for i, r in enumerate(res[section]["rows"]):
            color = "black" if r["attn"] is None else cmap(i % 20)
            band(ax, r["val_curves"], r["name"], color, 0)
        ax.set(title=f"{title}: validation accuracy", xlabel="extra epochs (0 = right after insertion)",
               ylabel="validation accuracy (%)")
        # Sigmoid gates start far below (their accuracy at insertion is in the table); the
        # axis follows the fine-tuning epochs.
        finals = [v for r in res[section]["rows"] for c in r["val_curves"] for v in c[1:]]
        if finals:
            ax.set_ylim(100 * min(finals) - 1.0, 100 * max(finals) + 0.5)
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.suptitle("Fashion-MNIST; mean ± std over seeds (curves of unfinished seeds are left out)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gate_unit(s: Settings, records: dict[str, dict[str, Any]], name: str, path: Path) -> None:
    """Per-class channel gates of one fine-tuned model (first seed, chosen configuration)."""
    try:
        g = chosen(records, name, s)
    except RuntimeError:
        return
    r = records.get(unit_key("full", name, g, s.seeds[0]))
    if r is None or not r.get("gates"):
        return
    labels = torch.arange(len(FASHION_MNIST_CLASSES))
    # One "image" per class holding that class's mean gate: per_class() then gives the
    # recorded means back, and the mean over them is the test set's (1,000 images per class).
    sites = tuple(SiteGates(x["module"], x["path"], x["attn"], x["gate"], x["method"], len(x["per_class"][0]),
                            tuple(x["size"]), torch.tensor(x["per_class"])) for x in r["gates"])
    record = GateRecord(sites, labels, FASHION_MNIST_CLASSES, ())
    plot_gates(record, path, title=f"{name}: channel gates per class on the test set after {s.epochs} fine-tuning "
                                   f"epochs ({grid_name(*g)}, seed {s.seeds[0]})")


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: one seed, short schedules, fewer models")
    p.add_argument("--out", help="results folder (default docs/fashion-mnist, or docs/fashion-mnist/quick)")
    p.add_argument("--work", help="folder for base weights (default runs/fashion-mnist[-quick])")
    p.add_argument("--data-root", help="folder with the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--resume", action="store_true", help="continue: keep the units that exist")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the units that exist; run nothing")
    p.add_argument("--only", choices=("lab", "retrofit"), help="run one experiment")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--lab-epochs", type=int)
    p.add_argument("--base-epochs", type=int)
    p.add_argument("--epochs", type=int, help="extra epochs every retrofit contender gets")
    p.add_argument("--low-epochs", type=int)
    p.add_argument("--attn", nargs="+", help="attention types with identity gates")
    p.add_argument("--sigmoid-attn", nargs="*", help="attention types with sigmoid gates")
    p.add_argument("--grid-lr", type=float, nargs="+", help="attention lr multipliers to choose from")
    p.add_argument("--grid-warmup", type=int, nargs="+", help="attention-only warm-up epochs to choose from")
    p.add_argument("--val-size", type=int)
    p.add_argument("--train-limit", type=int, help="use only the first N training images")
    p.add_argument("--threads", type=int)
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else FULL
    over = {"seeds": args.seeds, "lab_epochs": args.lab_epochs, "base_epochs": args.base_epochs,
            "epochs": args.epochs, "low_epochs": args.low_epochs, "attns": args.attn,
            "sigmoid_attns": args.sigmoid_attn, "attn_lr_mults": args.grid_lr, "attn_only": args.grid_warmup,
            "val_size": args.val_size, "train_limit": args.train_limit, "threads": args.threads}
    return replace(s, **{k: tuple(v) if isinstance(v, list) else v for k, v in over.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    s = settings_from(args)
    torch.set_num_threads(s.threads)
    out = Path(args.out or ("docs/fashion-mnist/quick" if args.quick else "docs/fashion-mnist"))
    work = Path(args.work or ("runs/fashion-mnist-quick" if args.quick else "runs/fashion-mnist"))
    # The command that continues the whole run: --only and --threads split one run over
    # processes (the units are the same), so they are not part of it.
    command = "python examples/fashion_mnist.py " + " ".join(continue_args(argv, ("--resume", "--report-only"),
                                                                          ("--only", "--threads")))
    units = Units(out)
    if units.all() and not (args.resume or args.report_only):
        print(f"fashion_mnist: error: {out}/units holds results of an earlier run; pass --resume to continue it, "
              "or choose another --out", file=sys.stderr)
        return 2
    saved = out / "settings.json"
    # The thread count changes only the order of float sums, not what is run: each unit
    # records its own, and processes with different counts may share one run.
    mine = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in s.__dict__.items() if k != "threads"},
                      sort_keys=True)
    if saved.is_file() and saved.read_text() != mine:
        print(f"fashion_mnist: error: {saved} was written with other settings; resume with the same options, "
              "or choose another --out", file=sys.stderr)
        return 2
    if args.report_only:
        write_report(out, s, units.all(), command.strip())
        print((out / "results.md").read_text())
        return 0
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(mine)
    runner = Runner(s, out, work, args.data_root, command.strip())
    try:
        runner.run(("lab", "retrofit") if args.only is None else (args.only,))
    except RetrofitError as e:
        print(f"fashion_mnist: error: {e}", file=sys.stderr)
        return 2
    write_report(out, s, units.all(), command.strip())
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
