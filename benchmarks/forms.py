"""The two forms of a retrofit side by side: the GraphModule (default) and keep_class=True.

For each model and attention type: ``retrofit()`` time (median of ``--reps`` calls), then
forward latency (eval, no_grad) and train-step time (forward, backward, SGD step), timed
in interleaved rounds (every round runs each form once, starting at a different one) so a
busy machine slows both alike, and the peak memory of each. Ratios are keep_class over
GraphModule, of medians.

    python benchmarks/forms.py --json benchmarks/results/forms-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Runner, machine  # noqa: E402

import retrofit  # noqa: E402

FORMS = {"graph module": False, "keep_class": True}


def run(name: str, attn: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    base = timm.create_model(name)
    out: dict[str, Any] = {"model": name, "attn": attn}
    models = {}
    for form, keep in FORMS.items():
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            models[form] = retrofit.retrofit(base, attn, keep_class=keep, input_size=args.size)
            times.append(time.perf_counter() - t)
        out[f"{form} retrofit_s"] = statistics.median(times)
    runners = {form: Runner(m, torch.device("cpu"), args.batch, args.size, False) for form, m in models.items()}
    for r in runners.values():
        r.forward()
        r.train_step()
    ms: dict[str, dict[str, list[float]]] = {f: {"forward": [], "train": []} for f in FORMS}
    forms = list(FORMS)
    for what, rounds in (("forward", args.rounds), ("train", args.train_rounds)):
        for i in range(rounds):
            for j in range(len(forms)):
                form = forms[(i + j) % len(forms)]
                r = runners[form]
                ms[form][what].append(r.forward() if what == "forward" else r.train_step())
    for form in FORMS:
        out[f"{form} forward_ms"] = statistics.median(ms[form]["forward"])
        out[f"{form} train_ms"] = statistics.median(ms[form]["train"])
        out[f"{form} train_peak_mb"] = runners[form].peak_mb("train")
        out[f"{form} rounds_ms"] = ms[form]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50"])
    p.add_argument("--attn", nargs="+", default=["se", "cbam"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--train-rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="retrofit() calls per form (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [run(m, a, args) for m in args.models for a in args.attn]
    table = []
    for r in rows:
        g, k = "graph module", "keep_class"
        table.append([f"{r['model']} + {r['attn']}", f"{r[f'{g} retrofit_s']:.2f} s", f"{r[f'{k} retrofit_s']:.2f} s",
                      f"{r[f'{k} forward_ms'] / r[f'{g} forward_ms']:.3f}x",
                      f"{r[f'{k} train_ms'] / r[f'{g} train_ms']:.3f}x",
                      f"{r[f'{g} train_peak_mb']:.0f} / {r[f'{k} train_peak_mb']:.0f} MB"])
    print(tabulate(table, headers=["model", "retrofit() GM", "retrofit() keep_class", "forward kc/GM",
                                   "train step kc/GM", "train peak GM / kc"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
