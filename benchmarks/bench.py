"""Retrofitted attention against timm's hand-written attention, measured in one interleaved run.

Three groups, each a plain model, timm's model with the attention written into its
blocks, and ``retrofit()`` of the plain model (fused, the default, and ``fuse=False``):

    se    resnet50   | timm seresnet50                        | retrofit(resnet50, "se")
    cbam  resnet50   | timm resnet50 with attn_layer="cbam"   | retrofit(resnet50, "cbam")
    eca   resnet50d  | timm ecaresnet50d                      | retrofit(resnet50d, "eca")

For each model: forward latency (eval, no_grad), train-step time (forward, backward, SGD
step, train mode) and the peak memory of each, eager and (unless ``--no-compile``) under
``torch.compile``. Timings are interleaved: every round runs each model once, starting at
a different model each round, and the table shows the median over rounds, so a machine
shared with other work slows all models alike. Ratios are of medians.

CPU always (fp32, NCHW); CUDA too when a GPU is there (bf16 autocast, channels-last).

Peak memory is what a forward or a train step allocates above what was allocated before
it (weights, and for CPU gradients of the previous step are freed first): on CUDA
``torch.cuda.max_memory_allocated``; on CPU, the running sum of the allocation events
``torch.profiler`` records with ``profile_memory=True`` (a separate, untimed run).

It also times ``retrofit()`` end to end (deep copy, trace, shapes, sites, plan, insertion,
verification), stage by stage, for resnet18 to resnet152 and regnety_320, per graph node.

Usage:
    python benchmarks/bench.py                         # everything, CPU (+ CUDA if present)
    python benchmarks/bench.py --no-compile --json out.json
    python benchmarks/bench.py --quick --groups se     # a fast look
    python benchmarks/bench.py --rewrite-only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch
from tabulate import tabulate
from torch import nn

import retrofit
from retrofit.planning import make_plan
from retrofit.rewrite import insert_attention
from retrofit.rulefile import resolve_rules
from retrofit.shapes import propagate_shapes, resolve_input_size
from retrofit.sites import find_sites
from retrofit.trace import trace
from retrofit.verify import compare

# group -> (plain model, timm's attention model and its constructor arguments, retrofit attn)
GROUPS: dict[str, tuple[str, tuple[str, dict[str, Any]], str]] = {
    "se": ("resnet50", ("seresnet50", {}), "se"),
    "cbam": ("resnet50", ("resnet50", {"block_args": {"attn_layer": "cbam"}}), "cbam"),
    "eca": ("resnet50d", ("ecaresnet50d", {}), "eca"),
}

REWRITE_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "regnety_320")

# The targets: (mode, group, numerator, denominator, at most).
TARGETS: list[tuple[str, str, str, str, float]] = [
    ("forward", "se", "retrofit", "timm", 0.96),
    ("forward", "se", "retrofit", "plain", 1.05),
    ("forward", "cbam", "retrofit", "timm", 0.95),
    ("forward", "eca", "retrofit", "timm", 0.98),
    ("train", "se", "retrofit", "timm", 1.0),
    ("train", "cbam", "retrofit", "timm", 1.0),
    ("train", "eca", "retrofit", "timm", 1.0),
]


@dataclass
class Variant:
    """One model under test."""

    key: str  # "retrofit(resnet50, se)"
    group: str  # "se", "cbam" or "eca"
    role: str  # "plain", "timm", "retrofit" or "unfused"
    build: Callable[[], nn.Module]


@dataclass
class Result:
    """Measurements of one variant in one setting (device, eager or compiled)."""

    key: str
    group: str
    role: str
    forward_ms: list[float] = field(default_factory=list)  # one per round
    train_ms: list[float] = field(default_factory=list)
    forward_peak_mb: float | None = None
    train_peak_mb: float | None = None
    compile_s: float | None = None  # first forward + first train step, compiled only

    def median(self, what: str) -> float | None:
        values = getattr(self, f"{what}_ms")
        return statistics.median(values) if values else None

    def best(self, what: str) -> float | None:
        """The fastest round: on a machine shared with other work, the least disturbed one."""
        values = getattr(self, f"{what}_ms")
        return min(values) if values else None


def _timm(name: str, kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _retrofitted(name: str, attn: str, fuse: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return retrofit.retrofit(timm.create_model(name, pretrained=False), attn, fuse=fuse, verify=False)

    return build


def variants(groups: list[str], unfused: bool) -> list[Variant]:
    """The models of the chosen groups; a plain model shared by two groups is built once."""
    out: dict[str, Variant] = {}
    for g in groups:
        plain, (timm_name, timm_kwargs), attn = GROUPS[g]
        timm_key = timm_name if not timm_kwargs else f"{timm_name}+timm-{attn}"
        out.setdefault(plain, Variant(plain, g, "plain", _timm(plain, {})))
        out[timm_key] = Variant(timm_key, g, "timm", _timm(timm_name, timm_kwargs))
        out[f"retrofit({plain}, {attn})"] = Variant(f"retrofit({plain}, {attn})", g, "retrofit",
                                                    _retrofitted(plain, attn, True))
        if unfused:
            key = f"retrofit({plain}, {attn}, fuse=False)"
            out[key] = Variant(key, g, "unfused", _retrofitted(plain, attn, False))
    return list(out.values())


def _check_timm_cbam(model: nn.Module) -> None:
    """timm builds resnet50 + CBAM through block_args; make sure it really did."""
    from timm.layers.cbam import CbamModule

    n = sum(isinstance(m, CbamModule) for m in model.modules())
    if n != 16:
        raise RuntimeError(f"resnet50 with block_args attn_layer='cbam' has {n} CbamModules, expected 16")


class Runner:
    """Runs one model on one device, eager or compiled, for timing and memory."""

    def __init__(self, model: nn.Module, device: torch.device, batch: int, size: int, compiled: bool) -> None:
        self.cuda = device.type == "cuda"
        fmt = torch.channels_last if self.cuda else torch.contiguous_format
        self.model = model.to(device=device, memory_format=fmt)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(batch, 3, size, size, generator=gen).to(device=device, memory_format=fmt)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4)
        self.fn: nn.Module | Callable[..., Any] = torch.compile(self.model) if compiled else self.model

    def _autocast(self) -> Any:
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def forward(self) -> float:
        self.model.eval()
        self._sync()
        t = time.perf_counter()
        with torch.no_grad(), self._autocast():
            self.fn(self.x)
        self._sync()
        return (time.perf_counter() - t) * 1e3

    def train_step(self) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        t = time.perf_counter()
        with self._autocast():
            loss = self.fn(self.x).float().square().mean()
        loss.backward()
        self.opt.step()
        self._sync()
        return (time.perf_counter() - t) * 1e3

    def peak_mb(self, what: str) -> float:
        """Peak memory of one forward or train step above what was allocated before it."""
        step = self.forward if what == "forward" else self.train_step
        self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        return _cpu_peak_mb(step)


def _cpu_peak_mb(step: Callable[[], Any]) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
         if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
    )
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak / 2**20


def measure(
    chosen: list[Variant], device: torch.device, *, batch: int, size: int, compiled: bool,
    fwd_rounds: int, train_rounds: int, memory: bool, log: Callable[[str], None],
) -> list[Result]:
    """Build every model, warm each up, then interleave timed rounds."""
    runners: list[tuple[Variant, Runner, Result]] = []
    for v in chosen:
        model = v.build()
        if v.role == "timm" and v.group == "cbam":
            _check_timm_cbam(model)
        r = Runner(model, device, batch, size, compiled)
        res = Result(v.key, v.group, v.role)
        t = time.perf_counter()
        r.forward()  # warm-up: oneDNN / cuDNN plans, compilation
        if train_rounds:
            r.train_step()
        if compiled:
            res.compile_s = time.perf_counter() - t
        log(f"  ready {v.key} ({time.perf_counter() - t:.1f} s warm-up)")
        runners.append((v, r, res))
    n = len(runners)
    for what, rounds in (("forward", fwd_rounds), ("train", train_rounds)):
        for i in range(rounds):
            for j in range(n):
                _, r, res = runners[(i + j) % n]
                getattr(res, f"{what}_ms").append(r.forward() if what == "forward" else r.train_step())
            log(f"  {what} round {i + 1}/{rounds}")
    if memory:
        for _, r, res in runners:
            res.forward_peak_mb = r.peak_mb("forward")
            if train_rounds:
                res.train_peak_mb = r.peak_mb("train")
    return [res for _, _, res in runners]


def _by_role(results: list[Result], group: str) -> dict[str, Result]:
    plain_name = GROUPS[group][0]
    out = {r.role: r for r in results if r.group == group}
    out["plain"] = next(r for r in results if r.key == plain_name)
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


Ratios = dict[str, dict[str, dict[str, float | None]]]


def ratios(results: list[Result], groups: list[str], stat: str = "median") -> Ratios:
    """{group: {what: {"retrofit/timm": r, "retrofit/plain": r, "timm/plain": r, "unfused/retrofit": r}}}."""
    out: Ratios = {}
    for g in groups:
        roles = _by_role(results, g)
        out[g] = {}
        for what in ("forward", "train"):
            m = {role: getattr(r, stat)(what) for role, r in roles.items()}
            out[g][what] = {
                "retrofit/timm": _ratio(m.get("retrofit"), m.get("timm")),
                "retrofit/plain": _ratio(m.get("retrofit"), m.get("plain")),
                "timm/plain": _ratio(m.get("timm"), m.get("plain")),
                "unfused/retrofit": _ratio(m.get("unfused"), m.get("retrofit")),
            }
        for what in ("forward", "train"):
            pk = {role: getattr(r, f"{what}_peak_mb") for role, r in roles.items()}
            out[g][f"{what}_peak"] = {"retrofit/timm": _ratio(pk.get("retrofit"), pk.get("timm")),
                                      "retrofit/plain": _ratio(pk.get("retrofit"), pk.get("plain"))}
    return out


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(results: list[Result], groups: list[str], stat: str = "median") -> str:
    """A row per model: times (``stat`` over rounds), ratios to the plain and timm models, peaks."""
    rows = []
    for g in groups:
        roles = _by_role(results, g)
        base, ref = roles["plain"], roles.get("timm")
        for role in ("plain", "timm", "retrofit", "unfused"):
            r = roles.get(role)
            if r is None:
                continue
            f, t = getattr(r, stat)("forward"), getattr(r, stat)("train")
            rows.append([
                g, r.key,
                _fmt(f), _fmt(_ratio(f, getattr(base, stat)("forward")), ".3f"),
                _fmt(_ratio(f, getattr(ref, stat)("forward")) if ref else None, ".3f"),
                _fmt(t), _fmt(_ratio(t, getattr(base, stat)("train")), ".3f"),
                _fmt(_ratio(t, getattr(ref, stat)("train")) if ref else None, ".3f"),
                _fmt(r.forward_peak_mb, ".0f"), _fmt(r.train_peak_mb, ".0f"),
            ])
    return tabulate(rows, headers=["group", "model", f"fwd ms ({stat})", "/plain", "/timm", f"train ms ({stat})",
                                   "/plain", "/timm", "fwd peak MB", "train peak MB"], disable_numparse=True)


def check_targets(rat: dict[str, Any], groups: list[str]) -> list[dict[str, Any]]:
    out = []
    for what, g, num, den, limit in TARGETS:
        if g not in groups:
            continue
        value = rat[g][what][f"{num}/{den}"]
        out.append({"what": what, "group": g, "ratio": f"{num}/{den}", "target": limit, "value": value,
                    "met": None if value is None else value <= limit})
        if what == "train":
            peak = rat[g]["train_peak"][f"{num}/{den}"]
            # Peaks are exact counts, not timings; within 1% (a few small gate tensors) is "no worse".
            out.append({"what": "train_peak", "group": g, "ratio": f"{num}/{den}", "target": 1.01, "value": peak,
                        "met": None if peak is None else peak <= 1.01})
    return out


def _stage_times(model: nn.Module, attn: str) -> dict[str, float]:
    """One retrofit() taken apart into its stages, each timed (the same calls api.retrofit makes)."""
    t: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        t[name] = now - clock
        clock = now

    work = copy.deepcopy(model)
    lap("copy")
    gm = trace(work)
    lap("trace")
    size = resolve_input_size(model, None)
    shapes = propagate_shapes(gm, size)
    lap("shapes")
    analysis = find_sites(gm, shapes)
    lap("sites")
    the_plan = make_plan(analysis, resolve_rules(attn, None))
    lap("plan")
    insert_attention(gm, the_plan.placements)
    lap("insert")
    compare(model, gm, size)
    lap("verify")
    return t


def rewrite_times(names: tuple[str, ...], attn: str, reps: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """retrofit() end to end per model: median of ``reps`` calls, stages, and time per node."""
    out = []
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        retrofit.retrofit(model, attn)  # warm-up: imports, oneDNN plans for the probe
        totals = []
        for _ in range(reps):
            t = time.perf_counter()
            gm = retrofit.retrofit(model, attn)
            totals.append(time.perf_counter() - t)
        stages = _stage_times(model, attn)
        nodes = len(trace(model).graph.nodes)
        total = statistics.median(totals)
        row = {"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "nodes": nodes,
               "sites": len(retrofit.get_report(gm).rows), "total_s": total, "ms_per_node": 1e3 * total / nodes,
               "stages_s": stages}
        log(f"  retrofit({name}): {total:.3f} s, {nodes} nodes")
        out.append(row)
    return out


def rewrite_table(rows: list[dict[str, Any]]) -> str:
    stages = list(rows[0]["stages_s"]) if rows else []
    body = [[r["model"], f"{r['params_m']:.1f}", r["nodes"], r["sites"], f"{r['total_s']:.3f}",
             f"{r['ms_per_node']:.2f}", *(f"{r['stages_s'][s]:.3f}" for s in stages)] for r in rows]
    return tabulate(body, headers=["model", "params M", "nodes", "sites", "retrofit() s", "ms/node",
                                   *(f"{s} s" for s in stages)], disable_numparse=True)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "retrofit": retrofit.__version__, "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["load_avg"] = os.getloadavg()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default="se,cbam,eca", help="comma-separated: se, cbam, eca")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CPU, and CUDA too when available")
    ap.add_argument("--batch", type=int, default=8, help="CPU batch size (default 8)")
    ap.add_argument("--cuda-batch", type=int, default=64, help="CUDA batch size (default 64)")
    ap.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    ap.add_argument("--rounds", type=int, default=None, help="forward rounds (default 9; --quick 3)")
    ap.add_argument("--train-rounds", type=int, default=None, help="train-step rounds (default 5; --quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-compile", action="store_true", help="eager only (compiling takes minutes on 2 cores)")
    ap.add_argument("--no-train", action="store_true", help="forward only")
    ap.add_argument("--no-memory", action="store_true", help="skip peak memory")
    ap.add_argument("--no-unfused", action="store_true", help="leave out retrofit(..., fuse=False)")
    ap.add_argument("--no-rewrite", action="store_true", help="skip timing retrofit() itself")
    ap.add_argument("--rewrite-only", action="store_true", help="only time retrofit() itself")
    ap.add_argument("--rewrite-reps", type=int, default=3, help="retrofit() calls per model (median)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds; retrofit() timing up to resnet50")
    ap.add_argument("--json", metavar="PATH", help="write every measurement here")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny gradients must not slow one model's CPU kernels
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        ap.error(f"unknown group(s) {sorted(unknown)} (valid: {', '.join(GROUPS)})")
    fwd_rounds = args.rounds or (3 if args.quick else 9)
    train_rounds = 0 if args.no_train else (args.train_rounds or (2 if args.quick else 5))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    out: dict[str, Any] = {"machine": machine(), "settings": vars(args), "runs": []}
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here")
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))

    if not args.rewrite_only:
        chosen = variants(groups, unfused=not args.no_unfused)
        for device in devices:
            batch = args.cuda_batch if device.type == "cuda" else args.batch
            for compiled in (False,) if args.no_compile else (False, True):
                setting = (f"{device.type} {'bf16 autocast, channels-last' if device.type == 'cuda' else 'fp32'}, "
                           f"batch {batch}, {args.size}x{args.size}, {'torch.compile' if compiled else 'eager'}")
                log(f"{setting}:")
                results = measure(chosen, device, batch=batch, size=args.size, compiled=compiled,
                                  fwd_rounds=fwd_rounds, train_rounds=train_rounds, memory=not args.no_memory,
                                  log=log)
                rat = ratios(results, groups)
                targets = check_targets(rat, groups) if device.type == "cpu" and not compiled else []
                print(f"\n## {setting}: median of rounds\n")
                print(table(results, groups))
                print(f"\n## {setting}: fastest round\n")
                print(table(results, groups, "best"))
                print()
                for t in targets:
                    mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
                    print(f"target {t['what']:<10} {t['group']:<5} {t['ratio']:<15} <= {t['target']:.2f}: "
                          f"{_fmt(t['value'], '.3f')} {mark}")
                if compiled:
                    print("compile + first steps (s): " + ", ".join(f"{r.key} {r.compile_s:.0f}" for r in results))
                out["runs"].append({"setting": setting, "device": device.type, "compiled": compiled, "batch": batch,
                                    "results": [asdict(r) for r in results], "ratios": rat,
                                    "ratios_fastest_round": ratios(results, groups, "best"), "targets": targets})
                sys.stdout.flush()

    if not args.no_rewrite:
        names = REWRITE_MODELS[:3] if args.quick else REWRITE_MODELS
        log("retrofit() end to end:")
        rows = rewrite_times(names, "se", args.rewrite_reps, log)
        out["rewrite"] = rows
        print("\n## retrofit(model, 'se') end to end (CPU, verification included)\n")
        print(rewrite_table(rows))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
