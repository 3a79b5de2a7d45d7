"""Does retrofitted attention help a trained YOLO detector? A measured answer on real images.

Ultralytics cannot download datasets here, so the example builds a detection set from real
images that install offline: Fashion-MNIST items (Debian's ``dataset-fashion-mnist``)
pasted at random positions and scales onto dark, noisy canvases, one to four per image,
each box the tight box of its item's pixels, the 10 classes kept. The set is generated
deterministically (one seed) from the Fashion-MNIST training images (train and val
canvases) and test images (test canvases).

Then:

1. a YOLOv8n base is trained from scratch on it (``--base-epochs``);
2. for each seed, the base is trained on for ``--epochs`` more, three ways, with the same
   hyperparameters: (a) as is; (b) with CBAM at every Bottleneck residual add, identity
   gates, through ``retrofit.ultralytics.trainer("cbam")``; (c) the same CBAM with the
   paper's sigmoid gates (``gate="sigmoid"``), what hand-editing a CBAM layer into the model
   yaml inserts (a hand edit also shifts the layer indices, so later layers lose their
   pretrained weights; (c) does not reproduce that extra harm).

Reported per run: mAP50-95 at insertion (before any training, on val), at the end (last
epoch, on val and on the held-out test canvases), and seconds per training epoch; per
variant, the mean and spread over seeds, and the paired difference to (a).

Every run writes ``units/<variant>__seed<s>.json`` under ``--out`` when it ends;
``--resume`` skips finished runs (the base's weights are kept under ``--runs``), and
``--report-only`` rewrites ``results.json`` / ``results.md`` from the units.

    python examples/yolo.py                  # the full experiment (hours on 2 CPU cores)
    python examples/yolo.py --resume         # continue it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics: no downloads, no update checks

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
VARIANTS = {
    "plain": "(a) YOLOv8n trained on",
    "cbam-identity": "(b) + CBAM, identity gates (retrofit)",
    "cbam-sigmoid": "(c) + CBAM, sigmoid gates (as a hand edit)",
}


# --------------------------------------------------------------------------- the data set


def _canvas(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, list]:
    """One canvas: 1-4 items at random scales and places (overlap kept small), boxes from pixels."""
    from PIL import Image

    canvas = rng.normal(20, 8, (size, size)).clip(0, 255)
    boxes: list[tuple[int, float, float, float, float]] = []
    taken: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            i = int(rng.integers(0, len(items)))
            side = int(round(28 * rng.uniform(0.8, 2.0)))
            x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            box = (x0, y0, x0 + side, y0 + side)
            if all(_iou(box, t) < 0.2 for t in taken):
                break
        else:
            continue
        item = np.asarray(Image.fromarray(items[i]).resize((side, side), Image.BILINEAR), dtype=np.float64)
        mask = item > 30
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        region = canvas[y0:y0 + side, x0:x0 + side]
        np.maximum(region, item, out=region)
        bx0, bx1, by0, by1 = x0 + xs.min(), x0 + xs.max() + 1, y0 + ys.min(), y0 + ys.max() + 1
        boxes.append((int(labels[i]), (bx0 + bx1) / 2 / size, (by0 + by1) / 2 / size, (bx1 - bx0) / size,
                      (by1 - by0) / size))
        taken.append(box)
    return canvas.astype(np.uint8), boxes


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def make_dataset(root: Path, sizes: dict[str, int], canvas: int, seed: int = 1234,
                 source: Path | None = None, classes: Sequence[int] | None = None) -> Path:
    """Write the canvases and their YOLO labels under ``root``; return the data yaml.
    Deterministic: the same arguments give the same files. ``source``: the Fashion-MNIST
    IDX files (default: Debian's). ``classes``: paste only items of these Fashion-MNIST
    classes, labelled 0, 1, ... in this order (default: all 10, labelled as they are)."""
    from PIL import Image

    from example_data import load_fashion_mnist  # isort: skip  (examples/example_data.py)

    spec: dict[str, Any] = {"sizes": sizes, "canvas": canvas, "seed": seed, "source": str(source)}
    if classes is not None:  # only then: the stamps of the 10-class sets stay valid
        spec["classes"] = list(classes)
    kept = list(range(len(CLASSES))) if classes is None else list(classes)
    relabel = np.full(len(CLASSES), -1)
    relabel[kept] = np.arange(len(kept))
    stamp = root / "dataset.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return root / "data.yaml"
    shutil.rmtree(root, ignore_errors=True)
    train_x, train_y = load_fashion_mnist(source, split="train")
    test_x, test_y = load_fashion_mnist(source, split="test")
    cut = len(train_x) * 5 // 6  # 50,000 of Fashion-MNIST's 60,000 training images
    sources = {"train": (train_x[:cut], train_y[:cut]), "val": (train_x[cut:], train_y[cut:]),
               "test": (test_x, test_y)}  # val canvases from items the training canvases never show
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        images, labels = sources[split]
        keep = np.isin(labels.numpy(), kept)
        items, kinds = images.numpy()[keep].astype(np.uint8), relabel[labels.numpy()[keep]]
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for k in range(n):
            pixels, boxes = _canvas(rng, items, kinds, canvas)
            Image.fromarray(pixels).convert("RGB").save(root / "images" / split / f"{k:05d}.png")
            (root / "labels" / split / f"{k:05d}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in boxes))
    names = "".join(f"  {i}: {CLASSES[c]}\n" for i, c in enumerate(kept))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\ntest: images/test\n"
                                    f"names:\n{names}")
    stamp.write_text(json.dumps(spec))
    return root / "data.yaml"


# --------------------------------------------------------------------------- the runs


def _train_args(args: argparse.Namespace, seed: int, epochs: int, project: Path, name: str) -> dict[str, Any]:
    return dict(epochs=epochs, imgsz=args.imgsz, batch=args.batch, seed=seed, deterministic=True, workers=0,
                amp=False, plots=False, device="cpu", optimizer="AdamW", lr0=args.lr0, warmup_epochs=1,
                project=str(project), name=name, exist_ok=True, verbose=False, val=True)


def _map(model: Any, data: Path, args: argparse.Namespace, split: str) -> float:
    metrics = model.val(data=str(data), imgsz=args.imgsz, batch=args.batch, split=split, device="cpu",
                        plots=False, verbose=False, workers=0)
    return float(metrics.box.map)


def _per_epoch(run: Path) -> float:
    import csv

    with (run / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    times = [float(r["time"]) for r in rows]
    return (times[-1]) / len(times)


def train_base(args: argparse.Namespace, data: Path) -> Path:
    """The YOLOv8n every variant starts from (trained once, seed 0); its last.pt."""
    from ultralytics import YOLO

    done = args.runs / "base" / "weights" / "last.pt"
    marker = args.runs / "base" / "done.json"
    if marker.is_file() and done.is_file():
        return done
    YOLO("yolov8n.yaml").train(data=str(data), **_train_args(args, 0, args.base_epochs, args.runs, "base"))
    marker.write_text(json.dumps({"epochs": args.base_epochs, "seconds_per_epoch": _per_epoch(args.runs / "base")}))
    return done


def _insert(variant: str) -> dict[str, Any] | None:
    return {"cbam-identity": {"gate": "identity"}, "cbam-sigmoid": {"gate": "sigmoid"}}.get(variant)


def run_unit(args: argparse.Namespace, data: Path, base: Path, variant: str, seed: int) -> dict[str, Any]:
    import torch
    from ultralytics import YOLO

    import retrofit
    import retrofit.ultralytics

    options = _insert(variant)
    start = YOLO(str(base))
    if options is not None:  # what the trainer builds, evaluated before any step
        torch.manual_seed(seed)
        start.model = retrofit.retrofit(start.model, "cbam", input_size=args.imgsz, **options)
    at_insertion = _map(start, data, args, "val")
    name = f"{variant}__seed{seed}"
    trainer = None if options is None else retrofit.ultralytics.trainer("cbam", **options)
    t0 = time.perf_counter()
    YOLO(str(base)).train(data=str(data), trainer=trainer, **_train_args(args, seed, args.epochs, args.runs, name))
    wall = time.perf_counter() - t0
    end = YOLO(str(args.runs / name / "weights" / "last.pt"))
    attention = sum(".cbam." in n for n, _ in end.model.named_parameters())
    return {"variant": variant, "seed": seed, "map_at_insertion": at_insertion, "map_val": _map(end, data, args, "val"),
            "map_test": _map(end, data, args, "test"), "seconds_per_epoch": _per_epoch(args.runs / name),
            "wall_seconds": wall, "attention_tensors": attention, "epochs": args.epochs}


# --------------------------------------------------------------------------- the report


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _reading(summary: dict[str, dict[str, list[float]]], base: dict[str, Any] | None) -> list[str]:
    """What the table says, from its own numbers."""
    lines = []
    if base and "cbam-identity" in summary:
        exact = all(v == base["map_val"] for v in summary["cbam-identity"]["map_at_insertion"])
        lines.append(f"- At insertion, identity-initialised CBAM {'equals' if exact else 'differs from'} the base on "
                     f"every seed (val mAP50-95 {base['map_val']:.4f}).")
    if base and "cbam-sigmoid" in summary:
        start = statistics.mean(summary["cbam-sigmoid"]["map_at_insertion"])
        lines.append(f"- Sigmoid gates, as a hand edit inserts them, start at {start:.4f}: "
                     f"{base['map_val'] - start:.4f} below the base the user had trained.")
    for variant in ("cbam-identity", "cbam-sigmoid"):
        d = summary.get(variant, {}).get("delta_test_vs_plain", [])
        sd = statistics.stdev(summary["plain"]["map_test"]) if len(summary.get("plain", {}).get("map_test", [])) > 1 \
            else None
        if d and sd is not None:
            lines.append(f"- After training, {VARIANTS[variant]} ends {statistics.mean(d):+.4f} test mAP50-95 from "
                         f"(a), against a seed-to-seed spread of (a) of {sd:.4f}: "
                         + ("within the noise." if abs(statistics.mean(d)) < sd else "beyond the noise."))
    lines.append("- s / epoch is wall time on a 2-core machine that ran other jobs during some units: not a speed "
                 "comparison ((a), with the least compute, has the largest figure); benchmarks/ measures speed.")
    return lines + [""]


def report(out: Path, args: argparse.Namespace, base: dict[str, Any] | None) -> None:
    units = [json.loads(p.read_text()) for p in sorted((out / "units").glob("*.json"))]
    seeds = sorted({u["seed"] for u in units})
    by = {(u["variant"], u["seed"]): u for u in units}
    rows, summary = [], {}
    for variant, label in VARIANTS.items():
        mine = [by[(variant, s)] for s in seeds if (variant, s) in by]
        if not mine:
            continue
        paired = [by[(variant, s)]["map_test"] - by[("plain", s)]["map_test"] for s in seeds
                  if (variant, s) in by and ("plain", s) in by]
        summary[variant] = {k: [u[k] for u in mine] for k in ("map_at_insertion", "map_val", "map_test",
                                                              "seconds_per_epoch")}
        summary[variant]["delta_test_vs_plain"] = paired
        rows.append([label, len(mine), _mean_sd(summary[variant]["map_at_insertion"]),
                     _mean_sd(summary[variant]["map_val"]), _mean_sd(summary[variant]["map_test"]),
                     "-" if variant == "plain" else (f"{statistics.mean(paired):+.4f} "
                                                     f"({', '.join(f'{d:+.4f}' for d in paired)})" if paired else "-"),
                     f"{statistics.mean(summary[variant]['seconds_per_epoch']):.1f}"])
    from tabulate import tabulate

    headers = ["variant", "seeds", "mAP50-95 at insertion (val)", "end, val", "end, test", "Δ test vs (a), per seed",
               "s / epoch (train + val)"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    sizes = f"{args.train} train / {args.val} val / {args.test} test canvases of {args.canvas}x{args.canvas}"
    text = ["# YOLOv8n with retrofitted CBAM on Fashion-MNIST detection canvases", "",
            f"Data: {sizes}, 1-4 Fashion-MNIST items each, 10 classes (`examples/yolo.py`).",
            f"Base: YOLOv8n from scratch, {args.base_epochs} epochs"
            + (f" (val mAP50-95 {base['map_val']:.4f}, test {base['map_test']:.4f})" if base else "") + ".",
            f"Each variant: the base trained on for {args.epochs} epochs, AdamW lr0={args.lr0}, batch {args.batch}, "
            f"imgsz {args.imgsz}, CPU, {len(seeds)} seed(s); mAP50-95 of the last epoch's weights. At insertion: "
            "the variant's model before any training step ((c): a sigmoid-gate draw with the run's seed, not the "
            "very draw its trainer made).", "", table, ""]
    text += _reading(summary, base)
    out.joinpath("results.md").write_text("\n".join(text))
    out.joinpath("results.json").write_text(json.dumps({"base": base, "units": units, "summary": summary,
                                                        "settings": {k: v for k, v in vars(args).items()
                                                                     if isinstance(v, (int, float, str, list))}},
                                                       indent=2))
    print("\n".join(text))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "yolo")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "yolo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--canvas", type=int, default=128)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr0", type=float, default=0.001)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--fashion-mnist", type=Path, default=None, help="folder of the IDX files (default: Debian's)")
    p.add_argument("--resume", action="store_true", help="skip the runs already finished")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    (args.out / "units").mkdir(parents=True, exist_ok=True)
    base_file = args.out / "base.json"
    if args.report_only:
        report(args.out, args, json.loads(base_file.read_text()) if base_file.is_file() else None)
        return
    if not args.resume:
        shutil.rmtree(args.out / "units")
        (args.out / "units").mkdir()
    data = make_dataset(args.runs / "data", {"train": args.train, "val": args.val, "test": args.test}, args.canvas,
                        source=args.fashion_mnist)
    base = train_base(args, data)
    if not base_file.is_file() or not args.resume:
        from ultralytics import YOLO

        model = YOLO(str(base))
        base_file.write_text(json.dumps({"map_val": _map(model, data, args, "val"),
                                         "map_test": _map(model, data, args, "test"),
                                         **json.loads((args.runs / "base" / "done.json").read_text())}))
    for seed in args.seeds:
        for variant in VARIANTS:
            unit = args.out / "units" / f"{variant}__seed{seed}.json"
            if args.resume and unit.is_file():
                continue
            result = run_unit(args, data, base, variant, seed)
            unit.write_text(json.dumps(result, indent=2))
            report(args.out, args, json.loads(base_file.read_text()))
    report(args.out, args, json.loads(base_file.read_text()))
    print("Continue: python examples/yolo.py --resume", file=sys.stderr)


if __name__ == "__main__":
    main()
