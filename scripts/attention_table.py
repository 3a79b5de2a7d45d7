"""Write ``docs/attention.md``: every attention type on timm's resnet50 with its built-in rules.

For each registered type that has a built-in rule file of the same name, the script
retrofits a fresh ``resnet50`` (``pretrained=False``) at 224x224 and measures, in one run:

* parameters added (from the report);
* FLOPs added: ``torch.utils.flop_counter.FlopCounterMode``, one forward at batch 1;
* CPU forward latency and train-step time relative to the plain model: every model timed
  once per round in a shuffled order between two runs of the plain model, the ratio taken
  against those two and its median over the rounds reported (interleaving cancels drift in
  a shared machine's speed);
* training memory: the bytes of the tensors a train-mode forward keeps for the backward
  pass (counted through ``torch.autograd.graph.saved_tensors_hooks``, each storage once),
  which is what grows with the batch; the CPU allocator keeps no peak counter to read;
* the largest output difference at init (the report's identity check).

Then the same types on Ultralytics' YOLOv8n (``yolov8n.yaml``, random weights) with each
type's built-in rules: parameters, FLOPs and CPU latency at 640x640, when Ultralytics is
installed.

It also tabulates the attention-matrix memory of the two types that are quadratic in H*W.
Nothing in the output is typed by hand; run it again to refresh the file.

Usage:
    python scripts/attention_table.py [--out docs/attention.md] [--batch 4] [--train-batch 2] [--rounds 7]
                                      [--types se eca ...] [--no-yolo]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from tabulate import tabulate
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import retrofit
from retrofit.attention import NonLocal, get_attention, list_attention
from retrofit.rulefile import builtin_rules_dir, resolve_rules

MODEL = "resnet50"
SIZE = 224
YOLO_SIZE = 640
ROOT = Path(__file__).resolve().parent.parent


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the GPU attention kernels; nn.MultiheadAttention on the CPU calls this one.
_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@dataclass(frozen=True)
class Row:
    """One attention type's figures."""

    name: str  # registered name (= built-in rule set)
    paper: str  # first line of its module's docstring
    arxiv: str  # arXiv id from its module's docstring, or ""
    sites: int  # modules inserted
    params: int  # parameters added
    flops: int  # forward FLOPs added at batch 1
    latency_ms: float  # median forward time at the benchmark batch
    ratio: float  # median per-round latency ratio to the plain model
    ratio_iqr: tuple[float, float]  # its first and third quartile over the rounds
    train_ratio: float  # median per-round train-step time ratio to the plain model
    train_iqr: tuple[float, float]
    saved_bytes: int  # bytes kept for the backward pass, train-mode forward at batch 1
    max_abs_diff: float | None  # output difference at init (eval mode)


@dataclass(frozen=True)
class YoloRow:
    """One attention type on YOLOv8n."""

    name: str
    sites: int
    params: int
    flops: int
    ratio: float
    ratio_iqr: tuple[float, float]
    max_abs_diff: float | None


def count_flops(model: nn.Module, size: int) -> int:
    """Forward FLOPs at batch 1. Gradients stay on so nn.MultiheadAttention takes its
    decomposed path, which the counter can see (its fused inference kernel is opaque)."""
    x = torch.randn(1, 3, size, size)
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        model(x)
    return counter.get_total_flops()


def forward_step(x: torch.Tensor) -> Callable[[nn.Module], None]:
    """An eval-mode forward without gradients."""

    def step(model: nn.Module) -> None:
        with torch.no_grad():
            model(x)

    return step


def train_step(x: torch.Tensor) -> Callable[[nn.Module], None]:
    """A train-mode forward, backward and SGD step (the optimizer's cost grows with the
    parameters, so it is part of what attention costs in training)."""
    optimizers: dict[int, torch.optim.Optimizer] = {}

    def step(model: nn.Module) -> None:
        opt = optimizers.setdefault(id(model), torch.optim.SGD(model.parameters(), lr=1e-6))
        opt.zero_grad(set_to_none=True)
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().mean().backward()
        opt.step()
        # 29 models' gradients at once would be several GB; each step makes its own
        opt.zero_grad(set_to_none=True)

    return step


def time_interleaved(
    models: dict[str, nn.Module], step: Callable[[nn.Module], None], rounds: int, warmup: int
) -> dict[str, tuple[float, list[float]]]:
    """``{name: (median ms, ratios to models['plain'], one per round)}``.

    Each round runs the plain model between every two others, in a shuffled order
    (``P A P B P ...``); a model's ratio in that round is its time over the mean of the two
    plain runs around it, which cancels a machine's slowly changing speed.
    """
    others = [name for name in models if name != "plain"]
    times: dict[str, list[float]] = {name: [] for name in models}
    ratios: dict[str, list[float]] = {name: [] for name in others}
    rng = random.Random(0)

    def run(name: str) -> float:
        t0 = time.perf_counter()
        step(models[name])
        return time.perf_counter() - t0

    for r in range(warmup + rounds):
        rng.shuffle(others)
        before = run("plain")
        for name in others:
            t = run(name)
            after = run("plain")
            if r >= warmup:
                times[name].append(t)
                times["plain"].append(after)
                ratios[name].append(t / ((before + after) / 2))
            before = after
        print(f"  round {r + 1}/{warmup + rounds}", file=sys.stderr)
    out = {name: (1e3 * statistics.median(times[name]), ratios[name]) for name in others}
    out["plain"] = (1e3 * statistics.median(times["plain"]), [1.0])
    return out


def saved_for_backward(model: nn.Module, size: int) -> int:
    """Bytes of the tensors a train-mode forward at batch 1 keeps for the backward pass,
    each storage counted once (parameters excluded: they exist with or without training)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.randn(1, 3, size, size))
    del out
    model.train(was_training)
    return sum(seen.values())


def describe(name: str) -> tuple[str, str]:
    """(first docstring line, arXiv id) of the module defining the attention class."""
    doc = sys.modules[get_attention(name).__module__].__doc__ or ""
    first = doc.strip().splitlines()[0].rstrip(".") if doc.strip() else name
    found = re.search(r"arXiv:(\d{4}\.\d{4,5})", doc)
    return first, found.group(1) if found else ""


def quadratic_memory_rows(sides: tuple[int, ...]) -> list[list[str]]:
    """Attention-matrix bytes per image (float32) of non-local and PSA at square map sizes."""
    psa_mask = resolve_rules("psa").rules[0].args.get("mask_size", 14)
    nl = NonLocal(8, sub_sample=True)
    rows = []
    for s in sides:
        hw = s * s
        with torch.no_grad():
            keys = nl._pool(torch.zeros(1, 1, s, s)).numel()
        psa_side = min(s, psa_mask)
        psa_default = min(s, 14)
        rows.append([
            f"{s}x{s}",
            _mib(4 * hw * hw),
            _mib(4 * hw * keys),
            _mib(4 * 2 * psa_default**4),
            _mib(4 * 2 * psa_side**4),
        ])
    return rows


def _quartiles(values: list[float]) -> tuple[float, float]:
    # quartiles of fewer than 4 values would be extrapolated (even below zero): show the range
    if len(values) < 4:
        return min(values), max(values)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _pct(part: float, whole: float) -> str:
    return f"+{100 * part / whole:.1f}%" if whole else "n/a"


def _ratio(value: float, iqr: tuple[float, float]) -> str:
    return f"{value:.2f}x ({iqr[0]:.2f}-{iqr[1]:.2f})"


def _yolo_section(rows: list[YoloRow], plain: tuple[int, int, float], args: argparse.Namespace, note: str) -> str:
    if not rows:
        return f"## On YOLOv8n\n\n{note}\n"
    params0, flops0, ms0 = plain
    table = tabulate(
        [
            [
                f"`{r.name}`",
                r.sites,
                f"{r.params:,} ({_pct(r.params, params0)})",
                f"{r.flops / 1e9:.3f} ({_pct(r.flops, flops0)})",
                _ratio(r.ratio, r.ratio_iqr),
                "not run" if r.max_abs_diff is None else f"{r.max_abs_diff:g}",
            ]
            for r in rows
        ],
        headers=["type", "sites", "params added", "GFLOPs added", "CPU latency", "Δ at init"],
        tablefmt="github",
    )
    return f"""## On YOLOv8n

The same types in Ultralytics' YOLOv8n detector (`YOLO("yolov8n.yaml").model`, random
weights, 80 classes) with each type's built-in rules (the Bottleneck adds inside C2f, as
`retrofit.ultralytics.trainer(NAME)` inserts them), at {YOLO_SIZE}x{YOLO_SIZE}. The plain model has
{params0:,} parameters and {flops0 / 1e9:.3f} GFLOPs and runs one image in {ms0:.0f} ms here.
Latency: eval mode, batch 1, interleaved as above ({args.rounds} rounds after {args.warmup}
warm-up rounds). {note}

{table}
"""


def render(
    rows: list[Row],
    plain: tuple[int, int, float, float, int],
    args: argparse.Namespace,
    mem: list[list[str]],
    load: str,
    yolo: str,
) -> str:
    params0, flops0, ms0, train_ms0, saved0 = plain
    psa_mask = resolve_rules("psa").rules[0].args.get("mask_size", 14)
    table = tabulate(
        [
            [
                f"`{r.name}`" + (f" ([paper](https://arxiv.org/abs/{r.arxiv}))" if r.arxiv else ""),
                r.sites,
                f"{r.params:,} ({_pct(r.params, params0)})",
                f"{r.flops / 1e9:.3f} ({_pct(r.flops, flops0)})",
                _ratio(r.ratio, r.ratio_iqr),
                _ratio(r.train_ratio, r.train_iqr),
                f"{_mib(r.saved_bytes - saved0)} ({_pct(r.saved_bytes - saved0, saved0)})",
                "not run" if r.max_abs_diff is None else f"{r.max_abs_diff:g}",
            ]
            for r in rows
        ],
        headers=["type", "sites", "params added", "GFLOPs added", "CPU forward", "CPU train step",
                 "train memory added", "Δ at init"],
        tablefmt="github",
    )
    memory = tabulate(
        mem,
        headers=["map", "non-local", "non-local, sub_sample", "PSA, mask_size 14", f"PSA, mask_size {psa_mask}"],
        tablefmt="github",
    )
    threads = torch.get_num_threads()
    few = (f" This run timed {args.rounds} rounds only, on a shared machine: the ranges show how far"
           " single train steps moved; rerun with `--rounds 7` or more on a quiet machine before reading"
           " a train-step ratio closely.") if args.rounds < 5 else ""
    return f"""# Attention types compared

<!-- Generated by scripts/attention_table.py; do not edit by hand, run the script again. -->

Every registered attention type ([what each is](attention-types.md)) with a built-in rule set of the same name, inserted into
timm's `{MODEL}` (`pretrained=False`) by `retrofit.retrofit(model, attn=NAME)` at
{SIZE}x{SIZE}. The plain model has {params0:,} parameters and {flops0 / 1e9:.3f} GFLOPs
(batch 1), runs a forward pass of a batch of {args.batch} in {ms0:.0f} ms and a train step of a
batch of {args.train_batch} in {train_ms0:.0f} ms here, and keeps {_mib(saved0)} per image for the
backward pass.

| column | how it is measured |
| --- | --- |
| sites | attention modules the built-in rules insert (`rules/NAME.toml`) |
| params added | `get_report(gm).params_added`; the percentage is of the plain model |
| GFLOPs added | `torch.utils.flop_counter.FlopCounterMode`, one forward at batch 1, minus the plain model's. It counts matrix multiplies, convolutions and attention kernels (a multiply-add is 2 FLOPs); element-wise work, pooling and softmax count zero, so parameter-free gates (`ge`'s default θ⁻, `simam`, `sge`) show almost nothing |
| CPU forward | forward time relative to the plain model: eval mode, `torch.no_grad()`, batch {args.batch}, {threads} CPU threads. Each round runs the {len(rows)} retrofitted models in a shuffled order with the plain model before and after each (`P A P B P ...`); a model's ratio is its time over the mean of the two plain runs around it, which cancels slow changes in the machine's speed; {args.rounds} rounds after {args.warmup} warm-up rounds, median ratio shown with its interquartile range over the rounds (the whole range when there are fewer than 4) |
| CPU train step | the same for one training step (train mode, forward, backward, SGD step) at batch {args.train_batch} |
| train memory added | the bytes a train-mode forward at batch 1 keeps for the backward pass (`torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters not counted), minus the plain model's; this is the part of training memory that grows with the batch. The CPU allocator has no peak counter; on a GPU, `torch.cuda.max_memory_allocated` adds the parameters, their gradients and the optimizer state (4 bytes each per float32 tensor, times two to three) |
| Δ at init | `get_report(gm).max_abs_diff`: the largest output change on a probe input; 0 means exact identity |

{table}

Measured with torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}
on {platform.machine()} ({_cpu_name()}, {os.cpu_count()} cores; 1-minute load average {load}).
Latency ratios move with the machine, the thread count and other load;
compare them within one run of this script, not across runs, and distrust a wide range.{few}

{yolo}
## Memory: non-local and PSA are quadratic in H*W

Both build an attention matrix with one entry per pair of positions: a non-local block
`(H*W) x (H*W')` per image, where `H*W'` is `H*W` or, with `sub_sample`, about a quarter of
it; PSA `(h*w) x (h*w)` per image for each of its two branches, where `h x w` is the map
average-pooled to at most `mask_size` on a side. The table gives that matrix's size per
image in float32 (training keeps it for the backward pass, so multiply by the batch size).
This is why their built-in rules take only maps of at most 14x14 (`max_size = 14`: the
last two stages of a ResNet at 224x224), with `sub_sample = true` for non-local and
`mask_size = {psa_mask}` for PSA. Channel self-attention (`chsa`) is quadratic in the
channels instead: `C x C` per image and head.

{memory}
"""


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _yolo_rows(names: list[str], args: argparse.Namespace) -> tuple[list[YoloRow], tuple[int, int, float], str]:
    """YOLOv8n with each type's built-in rules, or no rows and the reason."""
    if args.no_yolo:
        return [], (0, 0, 0.0), "Left out of this run (`--no-yolo`)."
    try:
        os.environ.setdefault("YOLO_OFFLINE", "1")
        from ultralytics import YOLO
    except ImportError:
        return [], (0, 0, 0.0), "Not measured: Ultralytics is not installed (`pip install torch-retrofit[ultralytics]`)."
    torch.manual_seed(0)
    plain = YOLO("yolov8n.yaml").model.eval()
    models: dict[str, nn.Module] = {"plain": plain}
    reports = {}
    skipped = []
    for name in names:
        print(f"retrofit yolov8n {name}", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                gm = retrofit.retrofit(copy.deepcopy(plain), attn=name, input_size=YOLO_SIZE).eval()
            except retrofit.RetrofitError as e:
                skipped.append(f"`{name}` ({e})")
                continue
        reports[name] = retrofit.get_report(gm)
        if not reports[name].rows:
            skipped.append(f"`{name}` (its rules select no site of YOLOv8n)")
            del reports[name]
            continue
        models[name] = gm
    flops = {name: count_flops(m, YOLO_SIZE) for name, m in models.items()}
    print("timing yolov8n", file=sys.stderr)
    timed = time_interleaved(models, forward_step(torch.randn(1, 3, YOLO_SIZE, YOLO_SIZE)), args.rounds, args.warmup)
    rows = [
        YoloRow(
            name=name,
            sites=len(report.rows),
            params=report.params_added,
            flops=flops[name] - flops["plain"],
            ratio=statistics.median(timed[name][1]),
            ratio_iqr=_quartiles(timed[name][1]),
            max_abs_diff=report.max_abs_diff,
        )
        for name, report in reports.items()
    ]
    note = f"Not inserted: {', '.join(skipped)}." if skipped else "Every type inserts."
    params0 = sum(p.numel() for p in plain.parameters())
    return rows, (params0, flops["plain"], timed["plain"][0]), note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "attention.md")
    parser.add_argument("--batch", type=int, default=4, help="forward-latency batch size")
    parser.add_argument("--train-batch", type=int, default=2, help="train-step batch size")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--types", nargs="*", help="only these types (default: all with a built-in rule set)")
    parser.add_argument("--no-yolo", action="store_true", help="leave out the YOLOv8n table")
    parser.add_argument("--data", type=Path, help="also write the measured figures here (JSON)")
    parser.add_argument("--from-data", type=Path, help="render the page from figures a --data run wrote; measure nothing")
    args = parser.parse_args(argv)
    if args.from_data:
        return _write(args, **json.loads(args.from_data.read_text()))

    names = args.types or [n for n in list_attention() if (builtin_rules_dir() / f"{n}.toml").is_file()]
    torch.manual_seed(0)
    plain = timm.create_model(MODEL, pretrained=False).eval()
    models: dict[str, nn.Module] = {"plain": plain}
    reports = {}
    for name in names:
        print(f"retrofit {name}", file=sys.stderr)
        gm = retrofit.retrofit(copy.deepcopy(plain), attn=name, input_size=SIZE).eval()
        models[name] = gm
        reports[name] = retrofit.get_report(gm)
    flops = {name: count_flops(m, SIZE) for name, m in models.items()}
    saved = {name: saved_for_backward(m, SIZE) for name, m in models.items()}
    for m in models.values():
        m.eval()
    print("timing forward", file=sys.stderr)
    load_before = _load()
    timed = time_interleaved(models, forward_step(torch.randn(args.batch, 3, SIZE, SIZE)), args.rounds, args.warmup)
    print("timing train step", file=sys.stderr)
    for m in models.values():
        m.train()
    trained = time_interleaved(models, train_step(torch.randn(args.train_batch, 3, SIZE, SIZE)), args.rounds,
                               args.warmup)
    load = f"{load_before} before the timing, {_load()} after"
    del models
    params0 = sum(p.numel() for p in plain.parameters())
    rows = []
    for name in names:
        report = reports[name]
        paper, arxiv = describe(name)
        rows.append(Row(
            name=name,
            paper=paper,
            arxiv=arxiv,
            sites=len(report.rows),
            params=report.params_added,
            flops=flops[name] - flops["plain"],
            latency_ms=timed[name][0],
            ratio=statistics.median(timed[name][1]),
            ratio_iqr=_quartiles(timed[name][1]),
            train_ratio=statistics.median(trained[name][1]),
            train_iqr=_quartiles(trained[name][1]),
            saved_bytes=saved[name],
            max_abs_diff=report.max_abs_diff,
        ))
    yolo_rows, yolo_plain, yolo_note = _yolo_rows(names, args)
    figures = {
        "rows": [asdict(r) for r in rows],
        "plain": (params0, flops["plain"], timed["plain"][0], trained["plain"][0], saved["plain"]),
        "load": load,
        "yolo_rows": [asdict(r) for r in yolo_rows],
        "yolo_plain": yolo_plain,
        "yolo_note": yolo_note,
        "settings": {k: getattr(args, k) for k in ("batch", "train_batch", "rounds", "warmup")},
    }
    if args.data:
        args.data.write_text(json.dumps(figures, indent=1))
    return _write(args, **figures)


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], plain: list[Any], load: str,
           yolo_rows: list[dict[str, Any]], yolo_plain: list[Any], yolo_note: str, settings: dict[str, int]) -> int:
    """Render the page from measured figures (as ``main`` measured them or a ``--data`` file holds them)."""
    for key, value in settings.items():
        setattr(args, key, value)
    table_rows = [Row(**{**r, "ratio_iqr": tuple(r["ratio_iqr"]), "train_iqr": tuple(r["train_iqr"])}) for r in rows]
    yolo = [YoloRow(**{**r, "ratio_iqr": tuple(r["ratio_iqr"])}) for r in yolo_rows]
    mem = quadratic_memory_rows((7, 14, 28, 56, 112))
    text = render(table_rows, tuple(plain), args, mem, load, _yolo_section(yolo, tuple(yolo_plain), args, yolo_note))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
