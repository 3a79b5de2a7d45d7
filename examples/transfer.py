"""Transfer on Fashion-MNIST classification: a network pretrained on one task, attention
inserted with identity gates, then fine-tuned on a new task with little or more data.

    python examples/transfer.py --resume          # the full run (one thread, a few hours) -> docs/transfer/classification/
    python examples/transfer.py --report-only     # rewrite results.json from the units

The source task is Fashion-MNIST's classes 0-4, the target task classes 5-9
(``examples/transfer_data.py``). The residual CNN of the Fashion-MNIST experiment (timm's
resnet18 narrowed to 16-32-64-128 channels, ``fashion_setup.residual_cnn``) is pretrained
once on the source task. Then, for each target size (50 and 500 training images per class),
each seed and each variant, it is fine-tuned on the target task with a new 5-class head:

plain fine-tuning; SE, ECA, CBAM, global context (GC), coordinate attention at their
built-in places with identity gates; non-local blocks after the residual blocks of the last
stage, identity; SE with the paper's sigmoid gates (what inserting the paper's module does).

Every variant gets the same hyperparameters. The seed sets the new head's init, the data
order and the augmentation (the source model stays fixed), so the variants of one seed are
compared with plain fine-tuning of the same seed. The attention learning rate (x1 or x10
the network's) is chosen per variant and size on the validation split with seed 0, never on
the test split; the other seeds use the choice.

Each run is a unit, ``units/<key>.json`` under ``--out``; ``--resume`` skips the units that
exist (several processes may share a run: each claims the next unit nobody holds). The
source model's weights are kept in ``--work`` (the full run's are committed). The report,
``docs/experiments/transfer.md``, is written by ``examples/transfer_report.py`` from these
units and the detection experiment's (``examples/yolo_transfer.py``).

Beside it in examples/: transfer_data.py (the split), transfer_stats.py (statistics and
gate movement), jobs.py (units and claims), fashion_setup.py (the residual CNN, training).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

import retrofit
from retrofit import RuleSet, parse_rules, resolve_rules
from retrofit.data import DataSplits
from retrofit.finetune import FinetuneConfig, fit

# isort: split
# Siblings in examples/ (first on sys.path).
from fashion_setup import accuracy, logits_of, residual_cnn, stack  # noqa: E402
from jobs import Units, continue_args, file_digest  # noqa: E402
from transfer_data import task_datasets  # noqa: E402
from transfer_runs import collect, run_plan, unit_key  # noqa: E402
from transfer_stats import gate_movement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Non-local blocks after the residual blocks of the last stage only: the paper's cheapest
# placement, and the only one where an (H*W)^2 attention stays small.
NONLOCAL_LAST_STAGE: dict[str, Any] = {
    "description": "Non-local blocks after every residual block of the last stage",
    "rule": [{"at": "residual-add", "attn": "nonlocal", "position": "after", "stages": [-1]}],
}


@dataclass(frozen=True)
class Variant:
    """One way of fine-tuning: plain, or with attention inserted first."""

    name: str  # unit and table key
    label: str  # what the report calls it
    attn: str | None = None  # built-in rule set; None with rules None: plain fine-tuning
    rules: dict[str, Any] | None = None  # a rule document (parse_rules) instead of a built-in set
    gate: str = "identity"  # gate form

    @property
    def plain(self) -> bool:
        return self.attn is None and self.rules is None

    def ruleset(self) -> RuleSet:
        if self.rules is not None:
            return parse_rules(self.rules, self.name)
        return resolve_rules(self.attn)


VARIANTS: tuple[Variant, ...] = (
    Variant("plain", "plain fine-tuning"),
    Variant("se", "SE, identity", "se"),
    Variant("eca", "ECA, identity", "eca"),
    Variant("cbam", "CBAM, identity", "cbam"),
    Variant("gc", "global context, identity", "gc"),
    Variant("coord", "coordinate attention, identity", "coord"),
    Variant("nonlocal", "non-local, last stage, identity", rules=NONLOCAL_LAST_STAGE),
    Variant("se-sigmoid", "SE, sigmoid gates", "se", gate="sigmoid"),
)


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers; written into settings.json."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sizes: tuple[int, ...] = (50, 500)  # target training images per class
    epochs: tuple[int, ...] = (60, 20)  # fine-tuning epochs, one per size (240 and 800 steps of 64)
    val_per_class: int = 200  # target (and source) validation images per class
    source_epochs: int = 10
    source_lr: float = 0.1
    source_batch_size: int = 128
    lr: float = 0.01  # fine-tuning peak lr (SGD, Nesterov momentum, warm-up + cosine)
    batch_size: int = 64
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    attn_lr_mults: tuple[float, ...] = (1.0, 10.0)  # chosen on val, seed 0 (ties: the earlier)
    variants: tuple[str, ...] = field(default_factory=lambda: tuple(v.name for v in VARIANTS))
    train_limit: int | None = None  # smoke runs: source images per class
    threads: int = 1

    def epochs_for(self, size: int) -> int:
        return self.epochs[self.sizes.index(size)]


QUICK = Settings(seeds=(0, 1), sizes=(5, 20), epochs=(2, 1), val_per_class=20, source_epochs=1, train_limit=100,
                 variants=("plain", "se", "gc", "se-sigmoid"))


def variant(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"no variant {name!r} (valid: {', '.join(v.name for v in VARIANTS)})")


# --------------------------------------------------------------------------- one fine-tuning run


@dataclass(frozen=True)
class Budget:
    """The fine-tuning hyperparameters every variant of one target size gets."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    warmup_epochs: float
    num_workers: int = 0  # data loader processes (image folders on a GPU machine want several)

    def config(self, seed: int, attn_lr_mult: float) -> FinetuneConfig:
        return FinetuneConfig(epochs=self.epochs, lr=self.lr, attn_lr=attn_lr_mult * self.lr,
                              batch_size=self.batch_size, weight_decay=self.weight_decay,
                              warmup_epochs=self.warmup_epochs, seed=seed, progress=False,
                              num_workers=self.num_workers)


def with_new_head(source: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of ``source`` with a fresh classifier for the target task, drawn with ``seed``."""
    model = copy.deepcopy(source)
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)  # type: ignore[operator]
    return model


def insert(model: nn.Module, v: Variant, seed: int, input_size: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """``model`` with ``v``'s attention (its random parts drawn with ``1000 + seed``) and the
    parameters it added; plain: a copy."""
    if v.plain:
        return copy.deepcopy(model), 0
    torch.manual_seed(1000 + seed)
    out = retrofit.retrofit(model, rules=v.ruleset(), gate=v.gate, input_size=input_size)
    return out, retrofit.get_report(out).params_added


def finetune_unit(source: nn.Module, v: Variant, seed: int, attn_lr_mult: float, data: DataSplits,
                  budget: Budget, gate_images: int | None = None) -> dict[str, Any]:
    """Fine-tune one variant on ``data`` from ``source`` and measure it: accuracy at insertion
    (and whether it equals plain fine-tuning's start bit for bit), after training on val and
    test, and how far the inserted modules moved from identity on the (first
    ``gate_images``) test images."""
    if data.test is None:
        raise ValueError("finetune_unit needs a data set with a test split")
    start = with_new_head(source, len(data.classes), seed)
    test_y, val_y = labels_of(data.test), labels_of(data.val)
    plain_logits = logits(start, data.test)
    model, added = insert(start, v, seed, data.input_size)
    at_insertion = logits(model, data.test)
    val_at_insertion = accuracy(logits(model, data.val), val_y)
    probe = first_images(data.test, gate_images)
    gates_before = None if v.plain else gate_movement(model, probe)
    hist = list(fit(model, data.train, data.val, budget.config(seed, attn_lr_mult)).history)
    return {
        "variant": v.name, "attn": v.attn, "rules": v.rules and v.rules["description"], "gate": v.gate,
        "seed": seed, "attn_lr_mult": None if v.plain else attn_lr_mult, "params_added": added,
        "train_images": len(data.train), "test_images": len(test_y), "epochs": budget.epochs,  # type: ignore[arg-type]
        "acc_at_insertion": accuracy(at_insertion, test_y),
        "equal_to_plain_at_insertion": None if v.plain else bool(torch.equal(at_insertion, plain_logits)),
        "max_abs_diff_at_insertion": None if v.plain else float((at_insertion - plain_logits).abs().max()),
        "val_acc_at_insertion": val_at_insertion,
        "val_acc": hist[-1]["val_acc"], "test_acc": accuracy(logits(model, data.test), test_y),
        "val_curve": [h["val_acc"] for h in hist], "train_loss": [h["train_loss"] for h in hist],
        "epoch_s": [round(h["time_s"], 2) for h in hist],
        "gates_at_insertion": gates_before, "gates": None if v.plain else gate_movement(model, probe.to(_device(model))),
    }


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _is_tensor_set(dataset: Any) -> bool:
    inner = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return isinstance(inner, torch.utils.data.TensorDataset)


def labels_of(dataset: Any) -> torch.Tensor:
    """Every label of an unaugmented data set (a TensorDataset, an ImageFolder, or a Subset of either)."""
    if _is_tensor_set(dataset):
        return stack(dataset)[1]
    if isinstance(dataset, torch.utils.data.Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return torch.as_tensor(dataset.targets)


@torch.no_grad()
def logits(model: nn.Module, dataset: Any, batch: int = 1000) -> torch.Tensor:
    """The model's logits on every image of ``dataset``, in order, on the CPU; the model is
    run in eval mode on its own device and left as it was."""
    was, device = model.training, _device(model)
    model.eval()
    try:
        if _is_tensor_set(dataset):
            x = stack(dataset)[0]
            return torch.cat([model(x[i:i + batch].to(device)).cpu() for i in range(0, len(x), batch)])
        loader = torch.utils.data.DataLoader(dataset, batch_size=min(batch, 128),
                                             num_workers=4 if device.type == "cuda" else 0)
        return torch.cat([model(bx.to(device)).cpu() for bx, _ in loader])
    finally:
        model.train(was)


def first_images(dataset: Any, limit: int | None) -> torch.Tensor:
    """The first ``limit`` images (all with None) of an unaugmented data set, as one tensor."""
    if _is_tensor_set(dataset):
        x = stack(dataset)[0]
        return x if limit is None else x[:limit]
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)])


# --------------------------------------------------------------------------- the source model


def source_model(num_classes: int = 5) -> nn.Module:
    """The residual CNN of the Fashion-MNIST experiment with a ``num_classes`` head."""
    model = residual_cnn()
    model.reset_classifier(num_classes)  # type: ignore[operator]
    return model


def train_source(s: Settings, data: DataSplits, weights: Path) -> dict[str, Any]:
    """Pretrain the source model (seed 0) on the source task; save it to ``weights``."""
    torch.manual_seed(0)
    model = source_model(len(data.classes))
    cfg = FinetuneConfig(epochs=s.source_epochs, lr=s.source_lr, batch_size=s.source_batch_size,
                         weight_decay=s.weight_decay, warmup_epochs=1.0, seed=0, progress=False)
    hist = list(fit(model, data.train, data.val, cfg).history)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(weights))
    assert data.test is not None  # task_datasets always has one
    test_x, test_y = stack(data.test)
    return {"task": "source", "classes": list(data.classes), "train_images": len(data.train),
            "epochs": s.source_epochs, "params": sum(p.numel() for p in model.parameters()),
            "val_acc": hist[-1]["val_acc"], "test_acc": accuracy(logits_of(model, test_x), test_y),
            "val_curve": [h["val_acc"] for h in hist], "epoch_s": [round(h["time_s"], 2) for h in hist],
            "weights_sha256": file_digest(weights)}


def load_source(weights: Path) -> nn.Module:
    model = source_model()
    load_model(model, str(weights))
    return model


# --------------------------------------------------------------------------- the run


class Runner:
    """Runs the units that do not exist yet, in order: the source model, then per target size
    the first seed at every grid point, then the other seeds at the chosen one
    (``transfer_runs``)."""

    def __init__(self, s: Settings, out: Path, work: Path, data_root: str | None,
                 on_unit: Callable[[], None] = lambda: None) -> None:
        self.s, self.out, self.work, self.data_root, self.on_unit = s, out, work, data_root, on_unit
        self.units = Units(out)
        self._data: dict[Any, DataSplits] = {}

    def data(self, task: str, per_class: int | None) -> DataSplits:
        key = (task, per_class)
        if key not in self._data:
            s = self.s
            if task == "source" and s.train_limit is not None:
                per_class = s.train_limit
            self._data[key] = task_datasets(task, per_class=per_class, val_per_class=s.val_per_class,
                                            root=self.data_root)
        return self._data[key]

    def source(self) -> nn.Module:
        weights = self.work / "source.safetensors"
        old = self.units.get("source")
        if old is not None and (not weights.is_file() or file_digest(weights) != old["weights_sha256"]):
            raise SystemExit(f"transfer: error: {weights} is missing or is not the source model the units in "
                             f"{self.units.dir} were built on; restore it or start a new --out")
        self.units.run("source", lambda: train_source(self.s, self.data("source", None), weights), self.on_unit)
        return load_source(weights)

    def run(self) -> None:
        s = self.s
        source = self.source()

        def start(size: int, v: Variant, m: float | None, seed: int) -> dict[str, Any] | None:
            budget = Budget(s.epochs_for(size), s.lr, s.batch_size, s.weight_decay, s.warmup_epochs)
            make = functools.partial(_target_unit, source, v, seed, m, self.data("target", size), budget, size)
            return self.units.run(unit_key(size, v.name, m, seed), make, self.on_unit, wait=False)

        run_plan(self.units.all, sizes=s.sizes, seeds=s.seeds, variants=[variant(n) for n in s.variants],
                 mults=s.attn_lr_mults, score="val_acc", start=start)


def _target_unit(source: nn.Module, v: Variant, seed: int, mult: float | None, data: DataSplits, budget: Budget,
                 size: int) -> dict[str, Any]:
    return {"size": size, **finetune_unit(source, v, seed, 1.0 if mult is None else mult, data, budget)}


def results_of(s: Settings, records: dict[str, dict[str, Any]], command: str) -> dict[str, Any]:
    """The settings and the units that count (``transfer_runs.collect``), per target size."""
    variants = [variant(n) for n in s.variants]
    return {"experiment": "classification", "metric": "test_acc", "command": command, "settings": settings_dict(s),
            "variants": {v.name: v.label for v in variants}, "left_out": {}, "source": records.get("source"),
            "sizes": collect(records, sizes=s.sizes, epochs=s.epochs, seeds=s.seeds, mults=s.attn_lr_mults,
                             variants=variants, score="val_acc")}


def results_from(out: Path) -> dict[str, Any]:
    """:func:`results_of` a run folder (its settings.json and units), for the report."""
    saved = json.loads((out / "settings.json").read_text())
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    return results_of(s, Units(out).all(), "python examples/transfer.py --resume")


def write_results(out: Path, s: Settings, records: dict[str, dict[str, Any]], command: str) -> None:
    """results.json, rewritten after every unit."""
    (out / "results.json").write_text(json.dumps(results_of(s, records, command), indent=1) + "\n")


def settings_dict(s: Settings) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items() if k != "threads"}


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, tiny sizes, 4 variants")
    p.add_argument("--out", type=Path, help="results folder (default docs/transfer/classification)")
    p.add_argument("--work", type=Path, help="folder of the source model's weights (default runs/transfer)")
    p.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--resume", action="store_true", help="continue: keep the units that exist")
    p.add_argument("--report-only", action="store_true", help="rewrite results.json from the units; run nothing")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--sizes", type=int, nargs="+", help="target training images per class")
    p.add_argument("--epochs", type=int, nargs="+", help="fine-tuning epochs, one per size")
    p.add_argument("--val-per-class", type=int)
    p.add_argument("--source-epochs", type=int)
    p.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS])
    p.add_argument("--grid-lr", type=float, nargs="+", help="attention lr multipliers to choose from")
    p.add_argument("--train-limit", type=int, help="source training images per class (smoke runs)")
    p.add_argument("--threads", type=int, help="torch threads (default 1)")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else Settings()
    over = {"seeds": args.seeds, "sizes": args.sizes, "epochs": args.epochs, "val_per_class": args.val_per_class,
            "source_epochs": args.source_epochs, "variants": args.variants, "attn_lr_mults": args.grid_lr,
            "train_limit": args.train_limit, "threads": args.threads}
    s = replace(s, **{k: tuple(v) if isinstance(v, list) else v for k, v in over.items() if v is not None})
    if len(s.epochs) != len(s.sizes):
        raise SystemExit(f"transfer: error: --epochs gives {len(s.epochs)} value(s) for {len(s.sizes)} size(s); "
                         "give one per size")
    if "plain" not in s.variants:
        raise SystemExit("transfer: error: --variants must include plain (every variant is compared with it)")
    return s


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    s = settings_from(args)
    torch.set_num_threads(s.threads)
    out = args.out or ROOT / "docs" / "transfer" / ("classification-quick" if args.quick else "classification")
    work = args.work or ROOT / "runs" / ("transfer-quick" if args.quick else "transfer")
    command = "python examples/transfer.py " + " ".join(continue_args(argv, ("--resume", "--report-only"),
                                                                     ("--threads",)))
    units = Units(out)
    if units.all() and not (args.resume or args.report_only):
        print(f"transfer: error: {units.dir} holds results of an earlier run; pass --resume to continue it, "
              "or choose another --out", file=sys.stderr)
        return 2
    saved, mine = out / "settings.json", json.dumps(settings_dict(s), sort_keys=True)
    if saved.is_file() and saved.read_text() != mine:
        print(f"transfer: error: {saved} was written with other settings; resume with the same options, "
              "or choose another --out", file=sys.stderr)
        return 2
    saved.write_text(mine)

    def report() -> None:
        write_results(out, s, units.all(), command.strip())

    if not args.report_only:
        Runner(s, out, work, args.data_root, report).run()
    report()
    print(f"results: {out / 'results.json'}; the page: python examples/transfer_report.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
