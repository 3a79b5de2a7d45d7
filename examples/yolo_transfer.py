"""Transfer in detection: a YOLOv8n pretrained on one task, fine-tuned on another, with and
without retrofitted attention, the way Ultralytics users fine-tune.

    python examples/yolo_transfer.py --resume         # the full run (one thread, hours) -> docs/transfer/detection/
    python examples/yolo_transfer.py --report-only    # rewrite results.json from the units

Data (``examples/transfer_data.py``): detection canvases of Fashion-MNIST items (the
generator of ``examples/yolo.py``), the source task holding only items of classes 0-4, the
target task only items of classes 5-9. A YOLOv8n is trained from scratch on the source
canvases once (its weights are kept in ``--runs`` and committed). Then, for each target size
(300 and 2,000 training canvases; the 300 are the first of the 2,000), each seed and each
variant, ``YOLO(source.pt).train(data=target, ...)``, the user's own workflow:

(a) plain fine-tuning; (b) CBAM at the Bottleneck adds, identity gates
(``retrofit.ultralytics.trainer("cbam")``); (c) global context after the backbone stages,
identity (GCNet's placement, rule set ``yolo-gc-backbone``); (d) coordinate attention after
the backbone stages, identity (``yolo-coord-backbone``); (e) EMA after the backbone stages,
identity (``yolo-ema-backbone``: run where that rule set is built in, left out of the
report with the reason where it is not); (f) CBAM with the paper's sigmoid gates, what a
hand edit inserts.

Every variant gets the same hyperparameters; the seed sets the data order and the
augmentation (both tasks have 5 classes, so Ultralytics copies the source's class head as
it copies every layer whose shape matches). The attention learning rate (x1 or x10 of
``lr0``) is chosen per variant and size on the validation canvases with seed 0, never on
the test canvases. The model each run starts from is captured inside Ultralytics' trainer
before its first step: its outputs are compared, bit for bit, with those of plain
fine-tuning's start of the same seed, and its mAP50-95 is measured (at insertion).

Each run is a unit, ``units/<key>.json`` under ``--out``; ``--resume`` skips the units that
exist. The report, ``docs/experiments/transfer.md``, is written by
``examples/transfer_report.py``. ``examples/transfer_real.py`` runs the same variants on
COCO-pretrained ``yolov8n.pt`` and a real data set.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics: no downloads, no update checks

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import retrofit  # noqa: E402
from retrofit import list_builtin_rules  # noqa: E402

# isort: split
# Siblings in examples/ (first on sys.path).
from jobs import Units, continue_args, file_digest  # noqa: E402
from transfer_data import first_canvases, task_canvases  # noqa: E402
from transfer_runs import collect, run_plan, unit_key  # noqa: E402
from transfer_stats import gate_movement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DetVariant:
    """One way of fine-tuning a YOLO: plain, or through ``retrofit.ultralytics.trainer``."""

    name: str  # unit and table key
    letter: str  # its letter in the experiment's description
    label: str  # what the report calls it
    rules: str | None = None  # built-in rule set; None: plain fine-tuning
    gate: str = "identity"

    @property
    def plain(self) -> bool:
        return self.rules is None

    def missing(self) -> str | None:
        """Why this variant cannot run here, or None."""
        if self.rules is not None and self.rules not in list_builtin_rules():
            return f"rule set {self.rules!r} is not built in here"
        return None

    def trainer(self, lr_mult: float) -> Any:
        import retrofit.ultralytics

        if self.plain:
            return None
        return retrofit.ultralytics.trainer(self.rules, gate=self.gate, lr_mult=lr_mult)


VARIANTS: tuple[DetVariant, ...] = (
    DetVariant("plain", "a", "(a) plain fine-tuning"),
    DetVariant("cbam", "b", "(b) CBAM at the Bottleneck adds, identity", "cbam"),
    DetVariant("gc-backbone", "c", "(c) global context after the backbone stages, identity", "yolo-gc-backbone"),
    DetVariant("coord-backbone", "d", "(d) coordinate attention after the backbone stages, identity",
               "yolo-coord-backbone"),
    DetVariant("ema-backbone", "e", "(e) EMA after the backbone stages, identity", "yolo-ema-backbone"),
    DetVariant("cbam-sigmoid", "f", "(f) CBAM, sigmoid gates (as a hand edit)", "cbam", gate="sigmoid"),
)


def variant(name: str) -> DetVariant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"no variant {name!r} (valid: {', '.join(v.name for v in VARIANTS)})")


@dataclass(frozen=True)
class DetSettings:
    """Everything that decides the numbers of the canvas experiment (settings.json). The
    variant list is not part of it: adding a variant leaves the other units valid."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sizes: tuple[int, ...] = (300, 2000)  # target training canvases
    epochs: tuple[int, ...] = (50, 20)  # fine-tuning epochs, one per size (500 and 1,260 steps of 32)
    val: int = 500  # target validation canvases
    test: int = 1000  # target test canvases
    source_train: int = 3000
    source_val: int = 500
    source_test: int = 500
    source_epochs: int = 30
    canvas: int = 128
    imgsz: int = 128
    batch: int = 32
    lr0: float = 0.001  # AdamW, Ultralytics' warm-up (1 epoch) and linear decay
    attn_lr_mults: tuple[float, ...] = (1.0, 10.0)  # chosen on val, seed 0 (ties: the earlier)
    gate_images: int = 500  # test canvases the gate movement is measured on
    device: str = "cpu"  # Ultralytics' device ("0": the first GPU)
    workers: int = 0  # data loader processes

    def epochs_for(self, size: int) -> int:
        return self.epochs[self.sizes.index(size)]


# --------------------------------------------------------------------------- one run


def train_args(s: DetSettings, seed: int, epochs: int, project: Path, name: str) -> dict[str, Any]:
    """YOLO.train's arguments, the same for every variant. No validation during training
    (Ultralytics still validates the last epoch); the units measure last.pt themselves."""
    return dict(epochs=epochs, imgsz=s.imgsz, batch=s.batch, seed=seed, deterministic=True, workers=s.workers,
                amp=False, plots=False, device=s.device, optimizer="AdamW", lr0=s.lr0, warmup_epochs=1,
                project=str(project), name=name, exist_ok=True, verbose=False, val=False)


def map50_95(model: Any, data: Path, s: DetSettings, split: str) -> float:
    metrics = model.val(data=str(data), imgsz=s.imgsz, batch=s.batch, split=split, device=s.device, plots=False,
                        verbose=False, workers=s.workers)
    return float(metrics.box.map)


def split_images(data: Path, split: str, size: int, limit: int) -> torch.Tensor:
    """The first ``limit`` images of a data yaml's split, RGB in [0, 1], resized to ``size``."""
    from PIL import Image
    from ultralytics.data.utils import IMG_FORMATS, check_det_dataset

    where = check_det_dataset(str(data))[split]
    files: list[Path] = []
    for p in where if isinstance(where, list) else [where]:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
        else:  # a list of image paths, relative to its folder
            files += [p.parent / line.strip() for line in p.read_text().splitlines() if line.strip()]
    out = []
    for f in files[:limit]:
        img = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        out = model(x.to(next(model.parameters()).device))
    return [t.cpu() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _seconds_per_epoch(run: Path) -> float:
    with (run / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["time"]) / len(rows)


def _compare(outputs: list[torch.Tensor], reference: Path) -> tuple[bool, float]:
    """Whether ``outputs`` equal plain fine-tuning's start (saved by its unit), bit for bit,
    and the largest difference."""
    if not reference.is_file():
        raise RuntimeError(f"{reference} is missing: plain fine-tuning of this seed runs first and saves its start")
    want = torch.load(reference, weights_only=True)
    if len(want) != len(outputs) or any(a.shape != b.shape for a, b in zip(outputs, want, strict=False)):
        return False, float("inf")
    return (all(torch.equal(a, b) for a, b in zip(outputs, want, strict=True)),
            max(float((a - b).abs().max()) for a, b in zip(outputs, want, strict=True)))


def detection_unit(source_pt: Path, v: DetVariant, seed: int, mult: float, data: Path, s: DetSettings,
                   epochs: int, runs: Path, name: str, plain_start: Path, test_split: str = "test") -> dict[str, Any]:
    """``YOLO(source_pt).train(data, trainer=...)`` for one variant and seed, measured: the
    model the trainer starts from (captured before its first step; its outputs on 8
    validation images against plain fine-tuning's start of the same seed, which the plain
    unit saves to ``plain_start``; its val mAP50-95), and last.pt on val and test, with the
    gate movement on the first test images."""
    from ultralytics import YOLO

    probe = split_images(data, "val", s.imgsz, 8)
    seen: dict[str, Any] = {}

    def at_start(trainer: Any) -> None:  # after get_model and the weights, before any step
        seen["start"] = copy.deepcopy(trainer.model).float().eval()

    # a unit stopped part-way left its folder: Ultralytics would append this run's epochs to
    # its results.csv, from which the time per epoch is read
    shutil.rmtree(runs / name, ignore_errors=True)
    yolo = YOLO(str(source_pt))
    yolo.add_callback("on_pretrain_routine_end", at_start)
    t0 = time.perf_counter()
    yolo.train(data=str(data), trainer=v.trainer(mult), **train_args(s, seed, epochs, runs, name))
    wall = time.perf_counter() - t0
    start = seen["start"]
    outputs = _outputs(start, probe)
    if v.plain:
        plain_start.parent.mkdir(parents=True, exist_ok=True)
        torch.save(outputs, plain_start)
        equal, diff = None, None
    else:
        equal, diff = _compare(outputs, plain_start)
    at_insertion = YOLO(str(source_pt))
    at_insertion.model = start
    images = split_images(data, test_split, s.imgsz, s.gate_images)
    end = YOLO(str(runs / name / "weights" / "last.pt"))
    return {
        "variant": v.name, "rules": v.rules, "gate": v.gate, "seed": seed, "attn_lr_mult": None if v.plain else mult,
        "epochs": epochs, "params_added": 0 if v.plain else sum(r.params for r in retrofit.get_report(start).rows),
        "equal_to_plain_at_insertion": equal, "max_abs_diff_at_insertion": diff,
        "map_val_at_insertion": map50_95(at_insertion, data, s, "val"),
        "map_val": map50_95(end, data, s, "val"), "map_test": map50_95(end, data, s, test_split),
        "seconds_per_epoch": _seconds_per_epoch(runs / name), "train_seconds": wall,
        "gates_at_insertion": None if v.plain else gate_movement(start, images, batch_size=64),
        "gates": None if v.plain else gate_movement(end.model.float(), images, batch_size=64),
    }


# --------------------------------------------------------------------------- the canvas experiment


def train_source(s: DetSettings, data: Path, runs: Path) -> dict[str, Any]:
    """YOLOv8n from scratch on the source canvases (seed 0); its last.pt under ``runs/source``
    (a run stopped part-way is resumed; ``train_seconds`` then counts this process only)."""
    from ultralytics import YOLO

    t0 = time.perf_counter()
    weights = runs / "source" / "weights" / "last.pt"
    if weights.is_file():  # a stopped run: Ultralytics continues it from its last epoch
        YOLO(str(weights)).train(resume=True)
    else:
        YOLO("yolov8n.yaml").train(data=str(data), **train_args(s, 0, s.source_epochs, runs, "source"))
    model = YOLO(str(weights))
    return {"task": "source", "epochs": s.source_epochs, "train_canvases": s.source_train,
            "map_val": map50_95(model, data, s, "val"), "map_test": map50_95(model, data, s, "test"),
            "seconds_per_epoch": _seconds_per_epoch(runs / "source"), "train_seconds": time.perf_counter() - t0,
            "weights_sha256": file_digest(weights)}


class DetectionRun:
    """Runs the units that do not exist yet: per target size, the first seed at every grid
    point, then the other seeds at the chosen one (``transfer_runs``)."""

    def __init__(self, s: DetSettings, out: Path, runs: Path, source_pt: Path, data: dict[int, Path],
                 variants: Sequence[DetVariant], on_unit: Callable[[], None] = lambda: None,
                 test_split: str = "test") -> None:
        self.s, self.out, self.runs, self.source_pt, self.data = s, out, runs, source_pt, data
        self.variants, self.on_unit, self.test_split = list(variants), on_unit, test_split
        self.units = Units(out)

    def run(self) -> None:
        s = self.s
        run_plan(self.units.all, sizes=s.sizes, seeds=s.seeds, variants=self.variants, mults=s.attn_lr_mults,
                 score="map_val", start=self._start)

    def _start(self, size: int, v: DetVariant, mult: float | None, seed: int) -> dict[str, Any] | None:
        key = unit_key(size, v.name, mult, seed)
        make = functools.partial(self._unit, size, v, mult, seed, key.replace("/", "__"))
        return self.units.run(key, make, self.on_unit, wait=False)

    def _unit(self, size: int, v: DetVariant, mult: float | None, seed: int, name: str) -> dict[str, Any]:
        plain_start = self.runs / "units" / f"target{size}-seed{seed}-plain-start.pt"
        return {"size": size, **detection_unit(self.source_pt, v, seed, 1.0 if mult is None else mult,
                                               self.data[size], self.s, self.s.epochs_for(size),
                                               self.runs / "units", name, plain_start, self.test_split)}


def results_of(settings: dict[str, Any], records: dict[str, dict[str, Any]], command: str,
               experiment: str = "detection") -> dict[str, Any]:
    """The settings and the units that count (``transfer_runs.collect``), per target size: every
    variant that can run here or has units; the others are listed with the reason."""
    done = {r.get("variant") for r in records.values()}
    shown = [v for v in VARIANTS if v.missing() is None or v.name in done]
    return {"experiment": experiment, "metric": "map_test", "command": command, "settings": settings,
            "variants": {v.name: v.label for v in shown},
            "left_out": {v.label: v.missing() for v in VARIANTS if v not in shown},
            "source": records.get("source"),
            "sizes": collect(records, sizes=settings["sizes"], epochs=settings["epochs"], seeds=settings["seeds"],
                             mults=settings["attn_lr_mults"], variants=shown, score="map_val")}


def results_from(out: Path) -> dict[str, Any]:
    """:func:`results_of` a run folder (its settings.json and units), for the report."""
    return results_of(json.loads((out / "settings.json").read_text()), Units(out).all(),
                      "python examples/yolo_transfer.py --resume")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "transfer" / "detection")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "yolo-transfer",
                   help="the canvases, the source model (runs/source) and every run's folder")
    p.add_argument("--fashion-mnist", type=Path, default=None, help="folder of the IDX files (default: Debian's)")
    p.add_argument("--resume", action="store_true", help="continue: keep the units that exist")
    p.add_argument("--report-only", action="store_true", help="rewrite results.json from the units; run nothing")
    p.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS],
                   help="run only these (default: every variant whose rule set is built in)")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--sizes", type=int, nargs="+", help="target training canvases")
    p.add_argument("--epochs", type=int, nargs="+", help="fine-tuning epochs, one per size")
    p.add_argument("--val", type=int)
    p.add_argument("--test", type=int)
    p.add_argument("--source-train", type=int)
    p.add_argument("--source-val", type=int)
    p.add_argument("--source-test", type=int)
    p.add_argument("--source-epochs", type=int)
    p.add_argument("--canvas", type=int)
    p.add_argument("--imgsz", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--grid-lr", type=float, nargs="+", help="attention lr multipliers to choose from")
    p.add_argument("--gate-images", type=int)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p


def settings_from(args: argparse.Namespace) -> DetSettings:
    over = {"seeds": args.seeds, "sizes": args.sizes, "epochs": args.epochs, "val": args.val, "test": args.test,
            "source_train": args.source_train, "source_val": args.source_val, "source_test": args.source_test,
            "source_epochs": args.source_epochs, "canvas": args.canvas, "imgsz": args.imgsz, "batch": args.batch,
            "attn_lr_mults": args.grid_lr, "gate_images": args.gate_images}
    s = replace(DetSettings(), **{k: tuple(v) if isinstance(v, list) else v for k, v in over.items()
                                  if v is not None})
    if len(s.epochs) != len(s.sizes):
        raise SystemExit(f"yolo_transfer: error: --epochs gives {len(s.epochs)} value(s) for {len(s.sizes)} "
                         "size(s); give one per size")
    if sorted(set(s.sizes)) != list(s.sizes):
        raise SystemExit("yolo_transfer: error: --sizes must be ascending (the smaller sets are the first "
                         "canvases of the largest)")
    return s


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    s = settings_from(args)
    torch.set_num_threads(args.threads)
    command = "python examples/yolo_transfer.py " + " ".join(
        continue_args(argv, ("--resume", "--report-only"), ("--threads", "--variants")))
    out, runs = args.out, args.runs
    units = Units(out)
    if units.all() and not (args.resume or args.report_only):
        print(f"yolo_transfer: error: {units.dir} holds results of an earlier run; pass --resume to continue it, "
              "or choose another --out", file=sys.stderr)
        return 2
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
    saved, mine = out / "settings.json", json.dumps(settings, sort_keys=True)
    if saved.is_file() and saved.read_text() != mine:
        print(f"yolo_transfer: error: {saved} was written with other settings; resume with the same options, "
              "or choose another --out", file=sys.stderr)
        return 2
    saved.write_text(mine)

    def report() -> None:
        (out / "results.json").write_text(json.dumps(results_of(settings, units.all(), command.strip()), indent=1)
                                          + "\n")

    if not args.report_only:
        wanted = [variant(n) for n in args.variants] if args.variants else list(VARIANTS)
        blocked = [f"{v.name}: {v.missing()}" for v in wanted if v.missing() is not None]
        if args.variants and blocked:
            print(f"yolo_transfer: error: {'; '.join(blocked)}", file=sys.stderr)
            return 2
        ready = [v for v in wanted if v.missing() is None]
        if not any(v.plain for v in ready):
            ready.insert(0, VARIANTS[0])  # every variant is compared with plain fine-tuning
        source_data = task_canvases(runs / "data", "source", {"train": s.source_train, "val": s.source_val,
                                                              "test": s.source_test}, s.canvas, args.fashion_mnist)
        target = task_canvases(runs / "data", "target", {"train": s.sizes[-1], "val": s.val, "test": s.test},
                               s.canvas, args.fashion_mnist)
        data = {n: target if n == s.sizes[-1] else first_canvases(target, n) for n in s.sizes}
        source_pt = runs / "source" / "weights" / "last.pt"
        old = units.get("source")
        if old is not None and (not source_pt.is_file() or file_digest(source_pt) != old["weights_sha256"]):
            print(f"yolo_transfer: error: {source_pt} is missing or is not the source model the units in {units.dir} "
                  "were built on; restore it or start a new --out", file=sys.stderr)
            return 2
        units.run("source", lambda: train_source(s, source_data, runs), report)
        for line in blocked:
            print(f"left out: {line}", file=sys.stderr)
        DetectionRun(s, out, runs, source_pt, data, ready, report).run()
    report()
    print(f"results: {out / 'results.json'}; the page: python examples/transfer_report.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
