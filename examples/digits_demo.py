"""Does retrofitting attention help a trained CNN? An offline experiment on real scans.

    python examples/digits_demo.py --quick      # about 2 minutes on 2 CPU cores
    python examples/digits_demo.py              # the full run behind the README's table

Data: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download),
resized to 32x32, one channel; a fixed stratified 80/20 split (360 validation images).
Model: timm's resnet18 narrowed to 16-32-64-128 channels, with a deep stem 8 channels wide
(8 residual blocks, 0.7 M parameters).

For each seed: train the baseline for --base-epochs, then give every contender the same
extra budget (--epochs, same optimizer, same warm-up + cosine schedule, same data order):

* baseline, continued: the same network trained on;
* retrofit ATTN, identity gates: attention inserted as an exact identity, then fine-tuned;
* retrofit ATTN, sigmoid gates: the papers' gate at random init, then fine-tuned.

Accuracy right after insertion is measured too; for identity gates the script asserts that
the logits equal the baseline's bit for bit. It writes results.md (the table), results.json
(every number, per seed), curves.png and gates_ATTN.png (what the first attention type's
gates learned, per class) to --out (default docs/digits/, docs/digits/quick/ with --quick).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import nn  # noqa: E402

import retrofit  # noqa: E402
from retrofit.errors import RetrofitError  # noqa: E402
from retrofit.finetune import FinetuneConfig, fit  # noqa: E402
from retrofit.gates import plot_gates, record_gates  # noqa: E402

# isort: split
from example_data import digits_datasets  # noqa: E402  (examples/, first on sys.path)

MODEL_KWARGS = {"num_classes": 10, "in_chans": 1, "channels": (16, 32, 64, 128), "stem_type": "deep", "stem_width": 8}
FULL = {"base_epochs": 10, "epochs": 6}
QUICK = {"base_epochs": 3, "epochs": 1}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"short schedules ({QUICK['base_epochs']} + {QUICK['epochs']} epochs) instead of "
                        f"{FULL['base_epochs']} + {FULL['epochs']}")
    p.add_argument("--out", help="output folder (default: docs/digits, or docs/digits/quick with --quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--base-epochs", type=int, help="baseline training epochs")
    p.add_argument("--epochs", type=int, help="extra epochs every contender gets")
    p.add_argument("--attn", nargs="+", help="attention types (default: se eca cbam, and chsa when registered)")
    p.add_argument("--size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--base-lr", type=float, default=0.1, help="baseline peak lr (SGD)")
    p.add_argument("--lr", type=float, default=0.02, help="peak lr of the network's own parameters when fine-tuning")
    p.add_argument("--attn-lr", type=float, default=0.2, help="peak lr of the new attention parameters")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these small convolutions gain little from more, "
                        "and lose a lot on busy cores)")
    return p


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(images)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).double().mean().item()


def contenders(attns: list[str]) -> list[tuple[str, str | None, str | None]]:
    """(label, attention, gate); attention None is the continued baseline."""
    out: list[tuple[str, str | None, str | None]] = [("baseline, continued", None, None)]
    for gate in ("identity", "sigmoid"):
        out += [(f"{a}, {gate} gates", a, gate) for a in attns]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def run(args: argparse.Namespace) -> dict:
    base_epochs = args.base_epochs or (QUICK if args.quick else FULL)["base_epochs"]
    epochs = args.epochs or (QUICK if args.quick else FULL)["epochs"]
    attns = args.attn or ["se", "eca", "cbam"] + (["chsa"] if "chsa" in retrofit.list_attention() else [])
    data = digits_datasets(args.size, 1)
    val_x = torch.stack([data.val[i][0] for i in range(len(data.val))])
    val_y = torch.stack([data.val[i][1] for i in range(len(data.val))])
    common = dict(batch_size=args.batch_size, progress=False, weight_decay=5e-4)
    results: dict = {"contenders": {}, "baseline": {"curve": [], "acc": []}, "skipped": {}}
    gate_plot = None
    for seed in args.seeds:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        base = retrofit.create_model("resnet18", **MODEL_KWARGS)
        hist = fit(base, data.train, data.val,
                   FinetuneConfig(epochs=base_epochs, lr=args.base_lr, warmup_epochs=1, seed=seed, **common)).history
        base_logits = logits_of(base, val_x)
        results["baseline"]["curve"].append([h["val_acc"] for h in hist])
        results["baseline"]["acc"].append(accuracy(base_logits, val_y))
        print(f"seed {seed}: baseline {base_epochs} epochs -> val acc {100 * accuracy(base_logits, val_y):.2f}%",
              flush=True)
        for label, attn, gate in contenders(attns):
            torch.manual_seed(1000 + seed)  # the sigmoid gates' random init
            if attn is None:
                model = copy.deepcopy(base)
                added = 0
            else:
                try:
                    model = retrofit.retrofit(base, attn, gate=gate, input_size=(1, args.size, args.size))
                except RetrofitError as e:
                    results["skipped"][label] = str(e).splitlines()[0]
                    continue
                added = retrofit.get_report(model).params_added
            at_insert = logits_of(model, val_x)
            if gate == "identity":
                assert torch.equal(at_insert, base_logits), f"{label}: identity insertion changed the logits"
            cfg = FinetuneConfig(epochs=epochs, lr=args.lr, attn_lr=args.attn_lr, warmup_epochs=0.5, seed=seed,
                                 **common)
            curve = [h["val_acc"] for h in fit(model, data.train, data.val, cfg).history]
            r = results["contenders"].setdefault(label, {"attn": attn, "gate": gate, "params_added": added,
                                                         "at_insertion": [], "final": [], "curve": []})
            r["at_insertion"].append(accuracy(at_insert, val_y))
            r["final"].append(curve[-1])
            r["curve"].append([accuracy(at_insert, val_y)] + curve)
            print(f"  {label:24s} insertion {100 * r['at_insertion'][-1]:6.2f}%  "
                  f"after {epochs} epochs {100 * curve[-1]:6.2f}%", flush=True)
            if seed == args.seeds[0] and attn == attns[0] and gate == "identity":
                gate_plot = record_gates(model, val_x, val_y, classes=data.classes)
        print(f"seed {seed} done in {time.perf_counter() - t0:.0f}s", flush=True)
    results["settings"] = {
        "seeds": args.seeds, "base_epochs": base_epochs, "epochs": epochs, "size": args.size,
        "batch_size": args.batch_size, "base_lr": args.base_lr, "lr": args.lr, "attn_lr": args.attn_lr,
        "model": "timm resnet18", "model_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in MODEL_KWARGS.items()},
        "train_images": len(data.train), "val_images": len(data.val),
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "retrofit": retrofit.__version__},
    }
    results["gate_record"] = gate_plot
    return results


def table(results: dict) -> str:
    cont = results["contenders"]["baseline, continued"]["final"]
    lines = [
        "| model | params added | val acc right after insertion (%) | val acc after fine-tuning (%) "
        "| Δ vs baseline continued (points) |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| baseline ({results['settings']['base_epochs']} epochs) | 0 | – | {pct(results['baseline']['acc'])} | – |",
    ]
    for label, r in results["contenders"].items():
        delta = [a - b for a, b in zip(r["final"], cont, strict=True)]
        d = "–" if r["attn"] is None else f"{100 * mean_std(delta)[0]:+.2f} ± {100 * mean_std(delta)[1]:.2f}"
        insert = pct(r["at_insertion"]) if r["attn"] is not None else "–"
        lines.append(f"| {label} | {r['params_added']:,} | {insert} | {pct(r['final'])} | {d} |")
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> None:
    s = results["settings"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1.4, 1.4]})
    base = torch.tensor(results["baseline"]["curve"]) * 100
    ep = range(1, base.shape[1] + 1)
    axes[0].plot(ep, base.mean(0), color="black")
    axes[0].fill_between(ep, base.mean(0) - base.std(0, correction=0), base.mean(0) + base.std(0, correction=0),
                         color="black", alpha=0.15)
    axes[0].set(title="baseline training", xlabel="epoch", ylabel="val accuracy (%)")
    cont = results["contenders"]["baseline, continued"]
    cmap = plt.get_cmap("tab10")
    for ax, gate in zip(axes[1:], ("identity", "sigmoid"), strict=True):
        rows = [("baseline, continued", cont, "black")] + [
            (label, r, cmap(i)) for i, (label, r) in enumerate(results["contenders"].items())
            if r["gate"] == gate
        ]
        for label, r, color in rows:
            c = torch.tensor(r["curve"]) * 100
            x = range(c.shape[1])
            m, sd = c.mean(0), c.std(0, correction=0)
            ax.plot(x, m, color=color, label=label, marker="o", ms=3)
            ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.12)
        ax.set(title=f"{gate} gates: {s['epochs']} extra epoch(s)", xlabel="extra epochs (0 = right after insertion)",
               ylabel="val accuracy (%)")
        ax.legend(fontsize=8, loc="lower right")
    lo = min(min(min(c) for c in r["curve"]) for r in results["contenders"].values() if r["gate"] != "sigmoid")
    axes[1].set_ylim(max(0, 100 * lo - 1.5), 100.2)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"digits 1x{s['size']}x{s['size']}, narrow timm resnet18; baseline continued and retrofits trained alike; mean ± std over seeds {s['seeds']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("docs/digits/quick" if args.quick else "docs/digits"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = run(args)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    command = "python examples/digits_demo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    s = results["settings"]
    md = [
        f"Command: `{command.strip()}` ({results['seconds']:.0f} s, {args.threads} thread(s)).",
        "",
        f"Data: scikit-learn digits, {s['train_images']} train / {s['val_images']} validation images at "
        f"1x{s['size']}x{s['size']}. Model: timm resnet18 with channels 16-32-64-128. Baseline: "
        f"{s['base_epochs']} epochs, SGD, peak lr {s['base_lr']}. Every contender then gets {s['epochs']} more "
        f"epochs (peak lr {s['lr']}, attention parameters {s['attn_lr']}, warm-up + cosine). "
        f"Mean ± std over seeds {s['seeds']}; one validation image is "
        f"{100 / s['val_images']:.2f} points.",
        "",
        table(results),
    ]
    if results["skipped"]:
        md += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items())]
    (out / "results.md").write_text("\n".join(md) + "\n")
    record = results.pop("gate_record")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_curves(results, out / "curves.png")
    written = ["results.md", "results.json", "curves.png"]
    if record is not None and record.sites:
        attn = record.sites[0].attn
        plot_gates(record, out / f"gates_{attn}.png",
                   title=f"{attn} channel gates (identity init) after {s['epochs']} fine-tuning epoch(s), seed "
                         f"{s['seeds'][0]}: mean per class on the {record.num_images} validation images")
        written.append(f"gates_{attn}.png")
    print("\n".join(md))
    print(f"\nwrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
