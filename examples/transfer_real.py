"""The transfer experiments at real scale: what to run on a GPU machine with the weights and
the data at hand. The variants, seeds, attention-lr selection, statistics and report are
those of the Fashion-MNIST runs (``examples/yolo_transfer.py``, ``examples/transfer.py``,
``examples/transfer_report.py``); only the source model and the data change.

Detection: COCO-pretrained ``yolov8n.pt`` fine-tuned on any Ultralytics data set (a data
yaml: VOC, or your own), through ``YOLO(...).train(trainer=retrofit.ultralytics.trainer(...))``.
The validation split the attention lr is chosen on is carved out of the training images
(``--val``, never trained on); the yaml's ``test`` split (its ``val`` where it has none) is
the test split. Training sets of each ``--sizes`` are the first images of one fixed shuffle
of the rest, so a smaller set is part of a larger one.

Classification: an ImageNet-pretrained timm model (``--model resnet50 --pretrained``) with
a new head, fine-tuned on an image folder ``DIR/train/CLASS/*``, chosen on ``DIR/val``,
tested on ``DIR/test``; ``--sizes`` training images per class.

    python examples/transfer_real.py detect --weights yolov8n.pt --data VOC.yaml --sizes 500 5000 \\
        --epochs 50 20 --imgsz 640 --batch 32 --device 0 --workers 8 --out runs/transfer-real/detection
    python examples/transfer_real.py classify --model resnet50 --pretrained --data DIR --sizes 10 100 \\
        --epochs 30 15 --workers 8 --out runs/transfer-real/classification
    python examples/transfer_real.py report --detection runs/transfer-real/detection \\
        --classification runs/transfer-real/classification --page runs/transfer-real/transfer.md

Both run commands continue a stopped run with ``--resume``. Nothing is downloaded: a
missing ``yolov8n.pt``, ImageNet weights not in the local cache, or a data yaml whose images
are not there stop the run at once with one line that says what to fetch. With
``--weights yolov8n.yaml`` (detection) or without ``--pretrained`` (classification) the
source model has random weights: a smoke run of the pipeline, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")  # Ultralytics: no downloads, no update checks

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from retrofit.data import DataSplits  # noqa: E402
from retrofit.errors import RetrofitError  # noqa: E402

# isort: split
import transfer  # noqa: E402
import transfer_report  # noqa: E402
import yolo_transfer  # noqa: E402
from jobs import Units, continue_args  # noqa: E402
from transfer_runs import run_plan, unit_key  # noqa: E402


class Stop(Exception):
    """A user error: one line on stderr, exit code 2."""


# --------------------------------------------------------------------------- detection


def _source_checkpoint(weights: str, runs: Path) -> Path:
    """The checkpoint every run starts from: ``weights`` itself, or for a model yaml a
    random-weight checkpoint written once (seed 0)."""
    if weights.endswith((".yaml", ".yml")):
        path = runs / "source-random.pt"
        if not path.is_file():
            import retrofit
            import retrofit.ultralytics

            torch.manual_seed(0)
            try:
                model = retrofit.create_model(f"ultralytics:{weights}")
            except RetrofitError as e:
                raise Stop(str(e)) from e
            runs.mkdir(parents=True, exist_ok=True)
            retrofit.ultralytics.save_checkpoint(model, path)
        return path
    path = Path(weights)
    if not path.is_file():
        raise Stop(f"{weights} not found; Ultralytics would download it, which needs the network: fetch it first "
                   f"(https://github.com/ultralytics/assets/releases/download/v8.3.0/{path.name}) and pass its path, "
                   "or pass a model yaml (yolov8n.yaml) for random weights")
    return path


def _image_files(where: Any) -> list[Path]:
    from ultralytics.data.utils import IMG_FORMATS

    files: list[Path] = []
    for p in where if isinstance(where, list) else [where]:
        p = Path(p)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
        elif p.is_file():  # a list of image paths, relative to its folder
            files += [(p.parent / line.strip()).resolve() for line in p.read_text().splitlines() if line.strip()]
    return files


def detection_data(yaml_path: str, sizes: list[int], val: int, root: Path) -> dict[int, Path]:
    """A data yaml per training size under ``root``: validation carved out of the training
    images, the training sets nested (the first images of one fixed shuffle of the rest),
    the test split the yaml's test (its val where it has none)."""
    import yaml
    from ultralytics.data.utils import check_det_dataset

    try:  # autodownload off: a data yaml's download field is code, and there is no network
        d = check_det_dataset(yaml_path, autodownload=False)
    except Exception as e:  # Ultralytics raises FileNotFoundError or its own errors here
        raise Stop(f"{yaml_path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; download the data set "
                   "first (its images and labels must be on disk)") from e
    train = _image_files(d["train"])
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [train[i] for i in order]
    if val + max(sizes) > len(shuffled):
        raise Stop(f"{yaml_path}: {len(shuffled)} training images; --val {val} and the largest size {max(sizes)} "
                   f"need {val + max(sizes)}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "val.txt").write_text("".join(f"{p.resolve()}\n" for p in shuffled[:val]))
    test = d.get("test") or d["val"]
    out = {}
    for n in sizes:
        (root / f"train-{n}.txt").write_text("".join(f"{p.resolve()}\n" for p in shuffled[val:val + n]))
        doc = {"path": str(root), "train": str(root / f"train-{n}.txt"), "val": str(root / "val.txt"),
               "test": [str(t) for t in test] if isinstance(test, list) else str(test),
               "names": dict(d["names"])}
        out[n] = root / f"data-{n}.yaml"
        out[n].write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def detect(args: argparse.Namespace, argv: list[str]) -> int:
    s = yolo_transfer.DetSettings(
        seeds=tuple(args.seeds), sizes=tuple(args.sizes), epochs=tuple(args.epochs), val=args.val, test=0,
        source_train=0, source_val=0, source_test=0, source_epochs=0, canvas=0, imgsz=args.imgsz, batch=args.batch,
        lr0=args.lr0, attn_lr_mults=tuple(args.grid_lr), gate_images=args.gate_images, device=args.device,
        workers=args.workers)
    _check_sizes(s.sizes, s.epochs)
    out, runs = args.out, args.out / "runs"
    source_pt = _source_checkpoint(args.weights, runs)
    data = detection_data(args.data, list(s.sizes), s.val, runs / "data")
    settings = {**{k: list(v) if isinstance(v, tuple) else v for k, v in vars(s).items()},
                "weights": args.weights, "data": args.data}
    units = _start(out, settings, args)
    command = "python examples/transfer_real.py " + " ".join(continue_args(argv, ("--resume",), ()))
    variants = [yolo_transfer.variant(n) for n in args.variants]
    blocked = [f"{v.name}: {v.missing()}" for v in variants if v.missing()]
    if blocked:
        raise Stop("; ".join(blocked))

    def report() -> None:
        res = yolo_transfer.results_of(settings, units.all(), command)
        (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")

    if units.get("source") is None:
        units.put("source", {"task": "source", "description": f"{args.weights} (as given)"
                             + (", random weights: a smoke run" if source_pt.name == "source-random.pt" else "")})
    yolo_transfer.DetectionRun(s, out, runs, source_pt, data, variants, report).run()
    report()
    return 0


# --------------------------------------------------------------------------- classification


def _source_model(name: str, pretrained: bool, img_size: int | None) -> torch.nn.Module:
    import retrofit

    try:
        model = retrofit.create_model(name, pretrained=pretrained)
    except RetrofitError as e:
        raise Stop(str(e)) from e
    if not callable(getattr(model, "reset_classifier", None)):
        raise Stop(f"{name} has no reset_classifier(); name a timm classification model")
    if img_size is not None:  # timm's data config reads the input size from here
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "input_size": (3, img_size, img_size),
                                "crop_pct": 1.0}
    return model


def classification_data(root: Path, model: torch.nn.Module, per_class: int) -> DataSplits:
    """``root/train`` cut to its first ``per_class`` images per class (one fixed shuffle per
    class), ``root/val``, ``root/test``, with the preprocessing of the model's weights."""
    from retrofit.data import imagefolder_dataset, imagefolder_datasets

    if not (root / "test").is_dir():
        raise Stop(f"{root / 'test'} is not a folder: the run needs {root}/test/CLASS/* beside train/ and val/ "
                   "(the attention lr is chosen on val; the test split is never used to choose)")
    try:
        data = imagefolder_datasets(root, model)
        test = imagefolder_dataset(root / "test", model)
    except RetrofitError as e:
        raise Stop(str(e)) from e
    if tuple(test.classes) != data.classes:
        raise Stop(f"{root / 'test'} has other classes than {root / 'train'}")
    targets = torch.as_tensor(data.train.targets)  # type: ignore[attr-defined]
    keep = []
    for k in range(len(data.classes)):
        idx = (targets == k).nonzero().flatten()
        if len(idx) < per_class:
            raise Stop(f"class {data.classes[k]!r} has {len(idx)} training images, fewer than --sizes {per_class}")
        keep.append(idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(k))][:per_class])
    train = Subset(data.train, torch.cat(keep).sort().values.tolist())
    return DataSplits(train, data.val, data.classes, data.input_size, data.data_config, test)


def classify(args: argparse.Namespace, argv: list[str]) -> int:
    source = _source_model(args.model, args.pretrained, args.img_size)  # first: fail fast without the weights
    s = transfer.Settings(seeds=tuple(args.seeds), sizes=tuple(args.sizes), epochs=tuple(args.epochs),
                          val_per_class=0, source_epochs=0, lr=args.lr, batch_size=args.batch_size,
                          attn_lr_mults=tuple(args.grid_lr), variants=tuple(args.variants))
    _check_sizes(s.sizes, s.epochs)
    if "plain" not in s.variants:
        raise Stop("--variants must include plain (every variant is compared with it)")
    data = {n: classification_data(args.data, source, n) for n in s.sizes}
    out = args.out
    units = _start(out, transfer.settings_dict(s), args)
    command = "python examples/transfer_real.py " + " ".join(continue_args(argv, ("--resume",), ()))

    def report() -> None:
        transfer.write_results(out, s, units.all(), command)

    if units.get("source") is None:
        units.put("source", {"task": "source", "description": f"timm {args.model}, "
                             + ("ImageNet weights" if args.pretrained else "random weights: a smoke run"),
                             "data": str(args.data), "classes": list(data[s.sizes[0]].classes)})
    def start(size: int, v: transfer.Variant, m: float | None, seed: int) -> dict[str, Any] | None:
        budget = transfer.Budget(s.epochs_for(size), s.lr, s.batch_size, s.weight_decay, s.warmup_epochs,
                                 num_workers=args.workers)
        return units.run(unit_key(size, v.name, m, seed),
                         lambda: {"size": size, **transfer.finetune_unit(source, v, seed, 1.0 if m is None else m,
                                                                         data[size], budget, args.gate_images)},
                         report, wait=False)

    run_plan(units.all, sizes=s.sizes, seeds=s.seeds, variants=[transfer.variant(n) for n in s.variants],
             mults=s.attn_lr_mults, score="val_acc", start=start)
    report()
    return 0


# --------------------------------------------------------------------------- shared


def _check_sizes(sizes: tuple[int, ...], epochs: tuple[int, ...]) -> None:
    if len(sizes) != len(epochs):
        raise Stop(f"--epochs gives {len(epochs)} value(s) for {len(sizes)} size(s); give one per size")
    if sorted(set(sizes)) != list(sizes) or sizes[0] < 1:
        raise Stop("--sizes must be positive and ascending")


def _start(out: Path, settings: dict[str, Any], args: argparse.Namespace) -> Units:
    units = Units(out)
    if units.all() and not args.resume:
        raise Stop(f"{units.dir} holds results of an earlier run; pass --resume to continue it, or choose another "
                   "--out")
    saved, mine = out / "settings.json", json.dumps(settings, sort_keys=True, default=str)
    if saved.is_file() and saved.read_text() != mine:
        raise Stop(f"{saved} was written with other settings; resume with the same options, or choose another --out")
    saved.write_text(mine)
    return units


def report(args: argparse.Namespace) -> int:
    results = {}
    for kind, folder, module in (("classification", args.classification, transfer),
                                 ("detection", args.detection, yolo_transfer)):
        if folder is not None:
            if not (folder / "settings.json").is_file():
                raise Stop(f"{folder} holds no run (no settings.json)")
            results[kind] = transfer_report.summarise(module.results_from(folder))
    if not results:
        raise Stop("give --detection and/or --classification: the folders of the runs")
    transfer_report.write_page(results, args.page, args.page.parent / "figures")
    print(f"wrote {args.page}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, required=True, help="results folder (units, settings, results.json)")
    common.add_argument("--resume", action="store_true", help="continue: keep the units that exist")
    common.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    common.add_argument("--sizes", type=int, nargs="+", required=True)
    common.add_argument("--epochs", type=int, nargs="+", required=True, help="one per size")
    common.add_argument("--grid-lr", type=float, nargs="+", default=[1.0, 10.0],
                        help="attention lr multipliers, chosen on val with the first seed")
    common.add_argument("--workers", type=int, default=0, help="data loader processes")
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")

    d = sub.add_parser("detect", parents=[common], help="YOLO from a pretrained .pt on an Ultralytics data yaml")
    d.add_argument("--weights", default="yolov8n.pt", help="the pretrained checkpoint, or a model yaml (random)")
    d.add_argument("--data", required=True, help="Ultralytics data yaml (its images and labels on disk)")
    d.add_argument("--val", type=int, default=500, help="training images held out to choose the attention lr")
    d.add_argument("--imgsz", type=int, default=640)
    d.add_argument("--batch", type=int, default=16)
    d.add_argument("--lr0", type=float, default=0.001)
    d.add_argument("--device", default="cpu", help="Ultralytics' device: cpu, 0, 0,1")
    d.add_argument("--gate-images", type=int, default=200, help="test images the gate movement is measured on")
    d.add_argument("--variants", nargs="+", default=[v.name for v in yolo_transfer.VARIANTS if v.missing() is None],
                   choices=[v.name for v in yolo_transfer.VARIANTS])

    c = sub.add_parser("classify", parents=[common], help="a timm model with ImageNet weights on an image folder")
    c.add_argument("--model", default="resnet50", help="timm model name")
    c.add_argument("--pretrained", action="store_true", help="ImageNet weights (from the Hugging Face cache or hub)")
    c.add_argument("--data", type=Path, required=True, help="folder with train/, val/ and test/, one folder per class")
    c.add_argument("--img-size", type=int, help="input size (default: the weights' own)")
    c.add_argument("--lr", type=float, default=0.01)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--gate-images", type=int, default=1000, help="test images the gate movement is measured on")
    c.add_argument("--variants", nargs="+", default=[v.name for v in transfer.VARIANTS],
                   choices=[v.name for v in transfer.VARIANTS])

    r = sub.add_parser("report", help="the page from finished (or partial) runs")
    r.add_argument("--detection", type=Path)
    r.add_argument("--classification", type=Path)
    r.add_argument("--page", type=Path, required=True, help="the Markdown page to write (figures beside it)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        if args.command == "detect":
            return detect(args, argv)
        if args.command == "classify":
            return classify(args, argv)
        return report(args)
    except Stop as e:
        print(f"transfer_real: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
