"""Does the gate-gradient score predict where attention pays? Measured on Fashion-MNIST.

    python examples/placement.py --quick           # smoke run, a few minutes -> docs/placement/quick/
    python examples/placement.py --resume          # the full run -> docs/placement/

The network and the protocol are those of examples/fashion_mnist.py's second experiment:
its pretrained residual CNN (timm resnet18 narrowed to 16-32-64-128 channels, 8 residual
blocks; the same weights, reused from --base-dir when that run trained them, else trained
here the same way), and its fine-tuning budget (3 epochs at peak lr 0.01, the attention's
lr 10x, warm-up then cosine, the same data order for every contender of a seed).

For each seed: `retrofit.score_sites` scores SE at the 8 residual sites on --score-batches
batches of the training split (never the validation or test images). Then every contender
gets the same budget from the same weights: no attention (the baseline trained on), SE at
all 8 sites, at the top-k sites by score (chosen by a rule with `select = { top = k }`), at
k random sites, at the bottom-k, and at each site alone. The single-site runs give each
site's gain (over the baseline trained on), which the score should predict: the script
reports Spearman's rank correlation between score and gain, per seed and over all seeds.

Every run is a unit under OUT/units/ (`--resume` continues); results.json, results.md and
score_vs_gain.png are rewritten after each unit from the units that exist. Processes started
with the same options on one --out share the run (`--resume --threads 1` twice on two cores):
each takes the next unit no other holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import retrofit  # noqa: E402
from retrofit import parse_rules, resolve_rules  # noqa: E402

# isort: split
# Siblings in examples/ (first on sys.path): the Fashion-MNIST experiment's network, data and
# training, shared rather than copied, and the job runner.
import fashion_setup  # noqa: E402
from example_data import fashion_mnist_datasets, load_fashion_mnist  # noqa: E402
from fashion_setup import (  # noqa: E402
    INPUT,
    accuracy,
    base_unit,
    config,
    delta,
    limited,
    load_base,
    logits_of,
    mean_std,
    pct,
    stack,
    train,
)
from jobs import Units, continue_args, file_digest  # noqa: E402


@dataclass(frozen=True)
class Settings:
    """What decides the numbers; written into results.json."""

    seeds: tuple[int, ...] = (0, 1, 2)
    k: int = 4  # sites in the top / random / bottom contenders (of 8)
    score_batches: int = 16  # batches of the training split the scores average over
    score_batch_size: int = 128
    train: Any = fashion_setup.FULL  # the Fashion-MNIST experiment's settings (base, budget, data)
    attn_lr_mult: float = 10.0  # the attention's learning rate, times the fine-tuning lr
    threads: int = 2


FULL = Settings()
QUICK = Settings(seeds=(0,), k=2, score_batches=2, train=replace(fashion_setup.QUICK, attns=("se",), sigmoid_attns=()))


def _rules(paths: list[str]) -> Any:
    """SE on the residual sites at exactly these paths."""
    return parse_rules({"rule": [{"at": "residual-add", "attn": "se", "include": sorted(paths)}]},
                       f"se at {', '.join(sorted(paths))}")


def _val_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float(F.cross_entropy(logits_of(model, images), labels))


def run_unit(base: nn.Module, rules: Any, scores: Any, seed: int, s: Settings, data: Any) -> dict[str, Any]:
    """Retrofit ``base`` with ``rules`` (None: no attention), fine-tune with the shared budget."""
    t = s.train
    torch.manual_seed(1000 + seed)
    if rules is None:
        model = copy.deepcopy(base)
        sites: list[str] = []
    else:
        model = retrofit.retrofit(base, rules=rules, scores=scores, input_size=INPUT)
        sites = [r.path for r in retrofit.get_report(model).rows]
    cfg = config(t, seed, epochs=t.epochs, lr=t.lr, attn_lr=s.attn_lr_mult * t.lr, attn_only_epochs=0,
                    warmup_epochs=0.5)
    hist = train(model, data.train, data.val, cfg)
    (test_x, test_y), (val_x, val_y) = stack(data.test), stack(data.val)
    return {"sites": sites, "test_acc": accuracy(logits_of(model, test_x), test_y),
            "val_acc": hist[-1]["val_acc"], "val_loss": _val_loss(model, val_x, val_y),
            "test_loss": _val_loss(model, test_x, test_y), "epoch_s": [round(h["time_s"], 2) for h in hist]}


class Runner:
    def __init__(self, s: Settings, out: Path, base_dir: Path, work: Path, data_root: str | None,
                 command: str) -> None:
        self.s, self.out, self.base_dir, self.work, self.command = s, out, base_dir, work, command
        self.units = Units(out)
        self.data = limited(fashion_mnist_datasets(data_root, val_size=s.train.val_size), s.train.train_limit)

    def unit(self, key: str, make: Any, wait: bool = True) -> dict[str, Any] | None:
        """The unit ``key``, made here unless it exists; while another process makes it, its
        record once stored, or with ``wait`` False, None (the next unit is taken instead)."""
        return self.units.run(key, make, lambda: write_report(self.out, self.s, self.units.all(), self.command,
                                                              len(self.data.test)), wait=wait)

    def base(self, seed: int) -> tuple[nn.Module, dict[str, str]]:
        """The Fashion-MNIST experiment's pretrained base of this seed, else one trained here the
        same way (into this run's own folder: that experiment's files are its own)."""
        shared = self.base_dir / f"base-seed{seed}.safetensors"
        weights = shared if shared.is_file() else self.work / f"base-seed{seed}.safetensors"
        if not weights.is_file():
            print(f"{shared} not found: training the base as examples/fashion_mnist.py does", flush=True)
            self.unit(f"base/seed{seed}", lambda: {**base_unit(seed, self.s.train, self.data, weights),
                                                    "weights_sha256": file_digest(weights)})
        return load_base(weights), {"base": str(weights), "base_sha256": file_digest(weights)}

    def run(self) -> None:
        s = self.s
        for seed in s.seeds:
            base, origin = self.base(seed)
            loader = DataLoader(self.data.train, batch_size=s.score_batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(seed))
            torch.manual_seed(seed)  # the training split's augmentation draws
            rec = self.unit(f"scores/seed{seed}", lambda base=base, origin=origin, loader=loader: {
                **origin, "scores": retrofit.score_sites(base, "se", loader, batches=s.score_batches,
                                                         input_size=INPUT).to_dict()})
            if rec.get("base_sha256") != origin["base_sha256"]:
                raise SystemExit(f"placement: error: the base of seed {seed} ({origin['base']}) is not the one "
                                 f"these units were measured on ({rec.get('base')}); start a new --out")
            scores = retrofit.SiteScores.from_dict(rec["scores"])
            ranked = [r.path for r in scores.ranked()]
            paths = [r.path for r in scores.rows]
            chosen_random = random.Random(seed).sample(paths, s.k)
            contenders: list[tuple[str, Any]] = [
                ("none", None), ("all", resolve_rules("se")),
                ("top", resolve_rules("se").selecting(top=s.k)), ("random", _rules(chosen_random)),
                ("bottom", _rules(ranked[-s.k:])),
                *[(f"only {p}", _rules([p])) for p in paths],
            ]
            # No run needs another's result: two processes on one --out take turns.
            for name, rules in contenders:
                self.unit(f"run/{name}/seed{seed}", lambda rules=rules, seed=seed, base=base, scores=scores: run_unit(
                    base, rules, scores, seed, s, self.data), wait=False)


# --------------------------------------------------------------------------- report


def ranks(v: list[float]) -> list[float]:
    """Ranks from 0, ties getting their average rank."""
    order = sorted(range(len(v)), key=v.__getitem__)
    out = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation; NaN when either side has a single value."""
    ra, rb = ranks(a), ranks(b)
    if len(a) < 2 or statistics.pstdev(ra) == 0 or statistics.pstdev(rb) == 0:
        return float("nan")
    return statistics.correlation(ra, rb)


def pooled_spearman(groups: list[tuple[list[float], list[float]]]) -> float:
    """Spearman's ρ over several seeds' (score, gain) pairs, ranked within each seed (scaled
    to 0..1), so that a seed's overall level does not count."""
    a: list[float] = []
    b: list[float] = []
    for x, y in groups:
        scale = max(len(x) - 1, 1)
        a += [r / scale for r in ranks(x)]
        b += [r / scale for r in ranks(y)]
    return spearman(a, b)


PERMUTATION_DRAWS = 10_000


def permutation_p(groups: list[tuple[list[float], list[float]]], draws: int = PERMUTATION_DRAWS,
                  seed: int = 0) -> float:
    """Two-sided p-value of :func:`pooled_spearman` against no relation: the gains are
    shuffled within each seed ``draws`` times; p = (shuffles at least as extreme + 1) /
    (draws + 1)."""
    rho = pooled_spearman(groups)
    if rho != rho:
        return float("nan")
    rng = random.Random(seed)
    hits = 0
    for _ in range(draws):
        shuffled = [(x, rng.sample(y, len(y))) for x, y in groups]
        hits += abs(pooled_spearman(shuffled)) >= abs(rho) - 1e-12
    return (hits + 1) / (draws + 1)


def collect(s: Settings, units: dict[str, dict[str, Any]], test_images: int) -> dict[str, Any]:
    seeds: dict[str, Any] = {}
    for seed in s.seeds:
        rec = units.get(f"scores/seed{seed}")
        if rec is None:
            continue
        rows = rec["scores"]["rows"]
        runs = {k.split("/")[1]: v for k, v in units.items() if k.startswith("run/") and k.endswith(f"/seed{seed}")}
        none = runs.get("none")
        singles = []
        for r in rows:
            run = runs.get(f"only {r['path']}")
            if run is not None and none is not None:
                singles.append({"path": r["path"], "score": r["score"], "params": r["params"],
                                "gain_test_acc": run["test_acc"] - none["test_acc"],
                                "gain_val_loss": none["val_loss"] - run["val_loss"]})
        corr = {}
        if len(singles) >= 3:
            score = [x["score"] for x in singles]
            corr = {"test_acc": spearman(score, [x["gain_test_acc"] for x in singles]),
                    "val_loss": spearman(score, [x["gain_val_loss"] for x in singles]),
                    "sites": len(singles)}
        seeds[str(seed)] = {"scores": rows, "runs": runs, "single_site": singles, "spearman": corr}
    contenders: dict[str, Any] = {}
    for name in ("none", "all", "top", "random", "bottom"):
        got = [(seed, v["runs"][name]) for seed, v in seeds.items() if name in v["runs"]]
        if got:
            base = [seeds[seed]["runs"].get("none") for seed, _ in got]
            contenders[name] = {
                "seeds": [int(seed) for seed, _ in got], "test_acc": [r["test_acc"] for _, r in got],
                "val_loss": [r["val_loss"] for _, r in got], "sites": [r["sites"] for _, r in got],
                "delta_test_acc": [r["test_acc"] - b["test_acc"] for (_, r), b in zip(got, base, strict=True) if b],
                "delta_val_loss": [b["val_loss"] - r["val_loss"] for (_, r), b in zip(got, base, strict=True) if b],
            }
    pooled = [x for v in seeds.values() for x in v["single_site"]]
    full = [v["single_site"] for v in seeds.values() if len(v["single_site"]) >= 3]
    spearman_pooled = {}
    for key in ("test_acc", "val_loss"):
        groups = [([x["score"] for x in g], [x[f"gain_{key}"] for x in g]) for g in full]
        if groups:
            spearman_pooled[key] = {"rho": pooled_spearman(groups), "p": permutation_p(groups)}
    # Does the score rank the sites alike in every seed (whatever it predicts)?
    by_path = [{r["path"]: r["score"] for r in v["scores"]} for v in seeds.values()]
    pairs = [(a, b) for i, a in enumerate(by_path) for b in by_path[i + 1:]]
    agreement = [spearman([a[k] for k in sorted(a)], [b[k] for k in sorted(a)]) for a, b in pairs if a.keys() == b.keys()]
    expected = len(s.seeds) * (1 + 5 + 8)
    done = sum(1 for k in units if k.startswith(("run/", "scores/")))
    return {"test_images": test_images, "settings": {"seeds": list(s.seeds), "k": s.k, "score_batches": s.score_batches,
                         "score_batch_size": s.score_batch_size, "attn_lr_mult": s.attn_lr_mult,
                         "epochs": s.train.epochs, "lr": s.train.lr, "base_epochs": s.train.base_epochs},
            "seeds": seeds, "contenders": contenders,
            "spearman_pooled": spearman_pooled, "permutation_draws": PERMUTATION_DRAWS,
            "score_agreement_between_seeds": statistics.fmean(agreement) if agreement else None,
            "single_site_runs": len(pooled), "complete": done >= expected, "units": {"done": done, "total": expected},
            "seconds": round(sum(u.get("seconds", 0.0) for u in units.values()), 1)}


def write_report(out: Path, s: Settings, units: dict[str, dict[str, Any]], command: str, test_images: int) -> None:
    res = collect(s, units, test_images)
    c = res["contenders"]
    status = ("complete" if res["complete"] else f"**partial**: {res['units']['done']} of {res['units']['total']} "
              f"runs done; `{command} --resume` continues")
    md = ["# Placement by score: does the gate-gradient score predict the gain?", "",
          f"Command: `{command}`; {res['seconds'] / 3600:.2f} h of run time ({status}). Written by "
          "examples/placement.py; nothing here is typed by hand.", "",
          f"Fashion-MNIST, the pretrained residual CNN of examples/fashion_mnist.py; every contender gets "
          f"{s.train.epochs} fine-tuning epochs (peak lr {s.train.lr}, attention lr x{s.attn_lr_mult:g}). Test "
          f"accuracy on the {res['test_images']:,} test images; Δ is the paired difference from no attention, "
          "per seed.", "",
          f"| contender (k = {s.k} of 8 sites) | test acc (%) | Δ test acc (points) | Δ val loss (baseline minus "
          "contender: above 0 is better) |", "| --- | ---: | ---: | ---: |"]
    for name, r in c.items():
        md.append(f"| {name} | {pct(r['test_acc'])} | "
                  f"{'–' if name == 'none' else delta(r['test_acc'], c['none']['test_acc']) if 'none' in c else '–'} | "
                  f"{'–' if name == 'none' or not r['delta_val_loss'] else _mean_std(r['delta_val_loss'], '.4f')} |")
    md += ["", "Single sites: each site's score and the gain when only it gets SE (Δ test acc in points; "
           "Δ val loss as above). Spearman's rank correlation between score and gain per seed:", "",
           "| seed | sites | ρ (score, Δ test acc) | ρ (score, Δ val loss) |", "| --- | ---: | ---: | ---: |"]
    for seed, v in res["seeds"].items():
        sp = v["spearman"]
        if sp:
            md.append(f"| {seed} | {sp['sites']} | {_rho(sp['test_acc'])} | {_rho(sp['val_loss'])} |")
    pooled = res["spearman_pooled"]
    if pooled:
        t, v = pooled["test_acc"], pooled["val_loss"]
        md += ["", f"Pooled over seeds (ranks within each seed, {res['single_site_runs']} single-site runs): "
               f"ρ (score, Δ test acc) = {_rho(t['rho'])} (p = {t['p']:.2f}), ρ (score, Δ val loss) = "
               f"{_rho(v['rho'])} (p = {v['p']:.2f}); p is two-sided, from {res['permutation_draws']:,} "
               "shuffles of the gains within each seed."]
    if res["score_agreement_between_seeds"] is not None:
        md += ["", "How alike the seeds rank the sites by score (Spearman's ρ between two seeds' scores, mean "
               f"over pairs of seeds): {_rho(res['score_agreement_between_seeds'])}."]
    md += ["", "| seed | site | score | rank | Δ test acc | Δ val loss |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for seed, v in res["seeds"].items():
        ranks = {r["path"]: i for i, r in enumerate(sorted(v["scores"], key=lambda r: -r["score"]), 1)}
        for x in v["single_site"]:
            md.append(f"| {seed} | {x['path']} | {x['score']:.3e} | {ranks[x['path']]} | "
                      f"{100 * x['gain_test_acc']:+.2f} | {x['gain_val_loss']:+.4f} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out / "score_vs_gain.png")


def _rho(value: float) -> str:
    return "– (no spread)" if value != value else f"{value:+.2f}"


def _mean_std(v: list[float], fmt: str) -> str:
    m, sd = mean_std(v)
    return f"{m:+{fmt}} ± {sd:{fmt}}" if len(v) > 1 else f"{m:+{fmt}}"


def plot(res: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, (seed, v) in enumerate(res["seeds"].items()):
        pts = v["single_site"]
        if not pts:
            continue
        for ax, key, scale in ((axes[0], "gain_test_acc", 100), (axes[1], "gain_val_loss", 1)):
            ax.scatter([x["score"] for x in pts], [scale * x[key] for x in pts], color=cmap(i), label=f"seed {seed}")
            for x in pts:
                ax.annotate(x["path"], (x["score"], scale * x[key]), fontsize=6, alpha=0.7)
    axes[0].set(xlabel="score (RMS gradient at the zero layer)", ylabel="Δ test accuracy (points)",
                title="gain when only that site gets SE")
    axes[1].set(xlabel="score (RMS gradient at the zero layer)", ylabel="Δ validation loss (baseline - run)",
                title="the same, in validation loss")
    for ax in axes:
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log")
        if ax.collections:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: one seed, short schedules")
    p.add_argument("--out", help="results folder (default docs/placement, or docs/placement/quick)")
    p.add_argument("--base-dir", help="pretrained bases (default runs/fashion-mnist[-quick], examples/fashion_mnist.py's)")
    p.add_argument("--work", help="where bases trained here go (default runs/placement[-quick])")
    p.add_argument("--data-root", help="folder with the Fashion-MNIST IDX files (default: Debian's)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the units that exist; run nothing")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--k", type=int)
    p.add_argument("--score-batches", type=int)
    p.add_argument("--val-size", type=int)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--base-epochs", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    s = QUICK if args.quick else FULL
    training = replace(s.train, **{k: v for k, v in {"val_size": args.val_size, "train_limit": args.train_limit,
                                                       "base_epochs": args.base_epochs, "epochs": args.epochs}.items()
                                    if v is not None})
    s = replace(s, train=training, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in
                                      {"seeds": args.seeds, "k": args.k, "score_batches": args.score_batches,
                                       "threads": args.threads}.items() if v is not None})
    torch.set_num_threads(s.threads)
    out = Path(args.out or ("docs/placement/quick" if args.quick else "docs/placement"))
    base_dir = Path(args.base_dir or ("runs/fashion-mnist-quick" if args.quick else "runs/fashion-mnist"))
    # The command that continues the whole run: --threads only splits it over processes.
    command = "python examples/placement.py " + " ".join(continue_args(argv, ("--resume", "--report-only"),
                                                                       ("--threads",)))
    if Units(out).all() and not (args.resume or args.report_only):
        print(f"placement: error: {out}/units holds results of an earlier run; pass --resume to continue it",
              file=sys.stderr)
        return 2
    if args.report_only:
        _, test_labels = load_fashion_mnist(args.data_root, "test")  # the report names the test set's size
        write_report(out, s, Units(out).all(), command.strip(), len(test_labels))
        print((out / "results.md").read_text())
        return 0
    work = Path(args.work or ("runs/placement-quick" if args.quick else "runs/placement"))
    runner = Runner(s, out, base_dir, work, args.data_root, command.strip())
    runner.run()
    write_report(out, s, Units(out).all(), command.strip(), len(runner.data.test))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
