"""Sweep retrofit over timm's and torchvision's registered classification models.

Two passes, each in worker processes with a time limit per model (a crash or a timeout
is a recorded failure, and the sweep goes on):

1. structure: build every model on the meta device (no memory, no init) and analyse it:
   parameters, residual adds, conv blocks.
2. checks: models with residual adds or conv blocks are built for real
   (``pretrained=False``), smallest first, and for each of ``se``, ``eca`` and ``cbam``
   retrofitted and checked:

   * identity at init on a real input: max |Δoutput| <= 1e-5 * max(1, max |output|);
   * backward works and reaches every new parameter;
   * the parameter delta equals the sum of the per-site closed forms;
   * the original model is untouched (every tensor and every train/eval flag).

A model that does not trace as a whole goes the partial path (its largest traceable
submodules are rewritten in place); the ``partial`` column lists the parts left alone.

CNNs (residual adds, or conv blocks with a norm, activation or pooling) are checked
before models whose only site is a bare conv (a transformer's patch embedding), smallest
first; models above ``--big`` parameters run one at a time after all the others (memory),
with batch 1 and gradients for the inserted parameters only. timm models made for a fixed
input size are built with ``img_size=--size`` where their constructor takes it
(``--native-size`` turns this off): position tables and attention windows shrink, the
layers that hold the sites do not, and a ViT-g at 518 pixels costs minutes of CPU per
check.
A model whose parameters, with retrofit's copy and its gradients, would not fit in this
machine's memory is recorded as ``skipped`` with the figures.

Writes ``structure.csv`` (pass 1), ``results.csv`` (one row per checked model, appended as
models finish, so ``--resume`` picks up an interrupted sweep) and ``summary.md`` (by
population and family, every failure and its reason); ``--summary-only`` rewrites the
summary from the CSV files (and compacts ``results.csv``).

    python scripts/zoo_sweep.py                       # everything (hours on 2 cores)
    python scripts/zoo_sweep.py --filter 'resnet*'    # a slice
    python scripts/zoo_sweep.py --source timm --filter resnet18 mobilenetv3_small_050  # a list
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import multiprocessing as mp
import multiprocessing.connection
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ATTNS = ("se", "eca", "cbam")
FIELDS = ["source", "family", "model", "params", "residual_adds", "conv_blocks", "cnn_blocks", "partial", "status",
          "input_size",
          *[f"{a}_{k}" for a in ATTNS for k in ("sites", "added", "diff", "seconds")],
          # --keep-class, from the se retrofit: units rewritten in place, residual adds whose
          # module went into the add's own block (the smallest unit), and out-of-reach sites.
          "kc_units", "kc_adds", "kc_adds_in_block", "kc_out_of_reach", "reason"]


def closed_form(attn: str, c: int) -> int:
    """Parameters one module adds at ``c`` channels (timm's defaults)."""
    if attn == "se":
        rd = max(8, int(c / 16 + 4) // 8 * 8)
        return 2 * c * rd + rd + c
    if attn == "eca":
        t = int(abs(math.log2(c) + 1) / 2)
        return max(t if t % 2 else t + 1, 3)
    rd = max(1, int(c / 16 + 0.5))
    return 2 * c * rd + 2 * 7 * 7 + 1


def build(source: str, name: str, device: str | None = None, **kwargs: Any) -> Any:
    import torch

    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **({"device": device} if device else {}), **kwargs)
    import torchvision.models as tvm

    if device:
        with torch.device(device):
            return tvm.get_model(name, weights=None)
    return tvm.get_model(name, weights=None)


def structure(source: str, name: str) -> dict[str, Any]:
    """Pass 1: parameters and site counts, from a model built on the meta device."""
    from retrofit.errors import TraceError
    from retrofit.partition import partition
    from retrofit.shapes import resolve_input_size

    try:
        meta = build(source, name, "meta")
    except Exception:
        # Some constructors read weight values while building (torchvision's RegNets): build
        # for real; analysis still reads only shapes.
        meta = build(source, name)
    try:
        parts = partition(meta, resolve_input_size(meta, None))
    except TraceError:
        # The partial path's probe must run control flow that reads values, which meta
        # tensors do not have: analyse real weights instead.
        meta = build(source, name)
        parts = partition(meta, resolve_input_size(meta, None))
    analysis = parts.analysis
    row: dict[str, Any] = {"source": source, "model": name, "params": sum(p.numel() for p in meta.parameters()),
                           "residual_adds": len(analysis.of_kind("residual-add")),
                           "conv_blocks": len(analysis.of_kind("conv-block")),
                           # Conv blocks with a norm, activation or pooling after the conv: the
                           # conv-BN chains of CNNs, not a bare conv such as a ViT's patch embedding.
                           "cnn_blocks": sum(len(s.layers) > 1 for s in analysis.of_kind("conv-block"))}
    if not parts.is_whole:
        # The whole model did not trace; the partial path found these parts it left alone.
        row["partial"] = "; ".join(p or "(top level)" for p, _ in parts.left_alone)
    row["status"] = "pending" if analysis.sites else "no sites"
    return row


def _leaves(out: Any) -> list[Any]:
    import torch

    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _fingerprint(model: Any) -> dict[str, bytes]:
    """A digest of every state-dict tensor's bytes: exact like a clone, without its memory."""
    import hashlib

    import torch

    out = {}
    for k, v in model.state_dict().items():
        flat = v.detach().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        out[k] = hashlib.blake2b(data, digest_size=16).digest() + str((v.dtype, tuple(v.shape))).encode()
    return out


def _memory_bytes() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def real_check(source: str, name: str, size: int, batch: int = 2, shrink: bool = False,
               frozen: bool = False, keep_class: bool = False, attns: tuple[str, ...] = ATTNS) -> dict[str, Any]:
    """Pass 2: retrofit se, eca and cbam into the real model and check each result.

    ``shrink``: a timm model made for a fixed input size is built with ``img_size=size``
    where its constructor takes it (position tables and attention windows shrink; the
    layers that hold the sites, and their channels, do not change). ``frozen``: only the
    inserted parameters take gradients (backward still runs through the whole model to
    reach them): memory for big models. ``keep_class``: retrofit with ``keep_class=True``
    and check too that every unit is rewritten in place with its own class.
    """
    import torch

    import retrofit

    torch.manual_seed(0)
    row: dict[str, Any] = {"source": source, "model": name}
    params = None
    if source == "timm":
        import timm

        params = sum(p.numel() for p in timm.create_model(name, pretrained=False, device="meta").parameters())
        # The model, retrofit's copy of it and the copy's gradients (or, frozen, the copy alone),
        # plus what building and copying hold at their peak: timm's SwinV2-CR-giant (2.6B
        # parameters, frozen) reached 9 bytes per parameter, 23.5 GB, and was OOM-killed.
        need = params * (9 if frozen else 13) + (1 << 30)
        if need > 0.9 * _memory_bytes():
            row.update(status="skipped", reason=f"needs about {need / 2**30:.0f} GiB for {params / 1e9:.2f}B "
                                                f"parameters; this machine has {_memory_bytes() / 2**30:.0f} GiB")
            return row
    model, built_with = None, ""
    if shrink and source == "timm":
        cfg = timm.models.get_pretrained_cfg(name)
        native = tuple(cfg.input_size) if cfg else (3, 224, 224)
        if cfg and cfg.fixed_input_size and native[-1] > size:
            try:
                model = build(source, name, img_size=size).eval()
                with torch.no_grad():
                    model(torch.randn(1, native[0], size, size))
                built_with = f" (img_size={size})"
            except Exception:
                model = None  # this constructor or forward does not take it: the model's own size
    if model is None:
        model = build(source, name).eval()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    native = tuple(cfg.get("input_size", (3, 224, 224)))
    in_size = native if cfg.get("fixed_input_size", False) and not built_with else (native[0], size, size)
    x = torch.randn(batch, *in_size)

    def reference() -> list[Any]:
        # Autograd on, as in the retrofitted model's forward below: some kernels differ
        # between grad and no-grad mode (timm's MaxViT-rmlp-base output moves by 1e-3 on
        # CPU, without retrofit), and identity must compare like with like.
        return [t.detach() for t in _leaves(model(x))]

    try:
        want = reference()
    except Exception:
        # Too small for this model (its own forward fails): use the size it was made for.
        in_size = native
        x = torch.randn(batch, *in_size)
        want = reference()
    row["input_size"] = "x".join(map(str, in_size)) + built_with
    scale = max(w.double().abs().max().item() for w in want)
    before = _fingerprint(model)
    flags = [m.training for m in model.modules()]
    for attn in attns:
        t0 = time.perf_counter()
        # Stack on attention the model already has, so every site exercises the rewrite.
        gm = retrofit.retrofit(model, attn, input_size=in_size, verify=False, on_existing="stack",
                               keep_class=keep_class).eval()
        report = retrofit.get_report(gm)
        if keep_class:
            for path in report.traced:
                if not isinstance(gm.get_submodule(path), type(model.get_submodule(path))):
                    raise AssertionError(f"{attn}: unit {path!r} lost its class")
            if attn == "se":
                adds = [r for r in report.rows if r.kind == "residual-add"]
                row.update(kc_units=len(report.traced), kc_adds=len(adds),
                           kc_adds_in_block=sum(r.module.rpartition(".")[0] == r.path for r in adds),
                           kc_out_of_reach=len(report.out_of_reach))
        prefixes = tuple(f"{r.module}." for r in report.rows)
        if frozen:
            for n, p in gm.named_parameters():
                p.requires_grad_(n.startswith(prefixes))
        # One forward with autograd serves both checks: identity (eval mode, as deployed)
        # and backward through every inserted module.
        got = _leaves(gm(x))
        diff = max((w.double() - g.detach().double()).abs().max().item() for w, g in zip(want, got, strict=True))
        if not diff <= 1e-5 * max(1.0, scale):
            raise AssertionError(f"{attn}: not identity at init, max |Δ| = {diff:.3g} (output scale {scale:.3g})")
        expected = sum(closed_form(attn, r.channels) for r in report.rows)
        if report.params_added != expected:
            raise AssertionError(f"{attn}: parameter delta {report.params_added} != closed form {expected}")
        sum(o.float().mean() for o in got).backward()
        new = [p for n, p in gm.named_parameters() if n.startswith(prefixes)]
        if any(p.grad is None for p in new):
            raise AssertionError(f"{attn}: backward did not reach every new parameter")
        row[f"{attn}_sites"] = len(report.rows)
        row[f"{attn}_added"] = report.params_added
        row[f"{attn}_diff"] = diff
        row[f"{attn}_seconds"] = round(time.perf_counter() - t0, 2)
        del gm, got
    if _fingerprint(model) != before:
        raise AssertionError("the original model's tensors changed")
    if flags != [m.training for m in model.modules()]:
        raise AssertionError("the original model's train/eval flags changed")
    row["status"] = "ok" if any(row[f"{a}_sites"] for a in attns) else "nothing selected"
    return row


def check_model(source: str, name: str, size: int, keep_class: bool = False) -> dict[str, Any]:
    """Both passes for one model, in this process."""
    row = structure(source, name)
    if row["status"] == "pending":
        row.update(real_check(source, name, size, keep_class=keep_class))
    return row


def _worker(conn: Any) -> None:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    while True:
        job = conn.recv()
        if job is None:
            return
        kind, source, name, size, batch, shrink, frozen, keep_class, attns = job
        try:
            conn.send(structure(source, name) if kind == "structure"
                      else real_check(source, name, size, batch, shrink, frozen, keep_class, attns))
        except Exception as e:  # a failure of this model, recorded; the sweep goes on
            first = (str(e).strip().splitlines() or [""])[0][:300]
            tb = traceback.extract_tb(e.__traceback__)
            where = f" [{Path(tb[-1].filename).name}:{tb[-1].lineno}]" if tb else ""
            conn.send({"source": source, "model": name, "status": "fail",
                       "reason": f"{kind}: {type(e).__name__}: {first}{where}"})
        _release_memory()


def _release_memory() -> None:
    """Collect garbage and trim the heap between jobs: workers were seen holding 10+ GiB
    after a big model, and the next big model beside them ran out of memory."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class Pool:
    """Worker processes, one job each at a time, each job under a time limit."""

    def __init__(self, workers: int, timeout: float) -> None:
        self.ctx = mp.get_context("spawn")
        self.size, self.timeout = workers, timeout
        self.slots: list[dict[str, Any]] = []

    def _spawn(self) -> dict[str, Any]:
        conn, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child,), daemon=True)
        proc.start()
        return {"proc": proc, "conn": conn, "job": None, "t0": 0.0}

    def run(self, jobs: list[tuple[Any, ...]], workers: int | None = None):  # type: ignore[no-untyped-def]
        """Yield ``(job, row)`` as jobs finish."""
        want = min(workers or self.size, self.size)
        while len(self.slots) < want:
            self.slots.append(self._spawn())
        active = self.slots[:want]
        todo = list(jobs)
        while todo or any(s["job"] for s in active):
            for i, s in enumerate(active):
                if s["job"] is None and todo:
                    if not s["proc"].is_alive():
                        active[i] = s = self._replace(s)
                    s["job"], s["t0"] = todo.pop(0), time.perf_counter()
                    s["conn"].send(s["job"])
            busy = [s for s in active if s["job"]]
            ready = multiprocessing.connection.wait([s["conn"] for s in busy], timeout=1.0)
            for i, s in enumerate(active):
                if s["job"] is None:
                    continue
                job = s["job"]
                _, source, name = job[:3]
                if s["conn"] in ready:
                    try:
                        row = s["conn"].recv()
                    except EOFError:
                        row = {"source": source, "model": name, "status": "fail",
                               "reason": f"{job[0]}: worker died (out of memory?)"}
                        active[i] = self._replace(s)
                    active[i]["job"] = None
                    yield job, row
                elif time.perf_counter() - s["t0"] > self.timeout:
                    active[i] = self._replace(s)
                    yield job, {"source": source, "model": name, "status": "fail",
                                "reason": f"{job[0]}: timeout after {self.timeout:.0f}s"}
        self.slots[:want] = active

    def _replace(self, slot: dict[str, Any]) -> dict[str, Any]:
        slot["proc"].kill()
        slot["proc"].join()
        new = self._spawn()
        self.slots = [new if s is slot else s for s in self.slots]
        return new

    def close(self) -> None:
        for s in self.slots:
            if s["proc"].is_alive():
                s["conn"].send(None)
                s["proc"].join(timeout=10)


def families() -> dict[str, str]:
    import timm

    return {n: m for m in timm.list_modules() for n in timm.list_models(module=m)}


def model_list(source: str, patterns: list[str]) -> list[tuple[str, str]]:
    import timm
    import torchvision.models as tvm

    names: list[tuple[str, str]] = []
    if source in ("timm", "all"):
        names += [("timm", n) for n in timm.list_models()]
    if source in ("torchvision", "all"):
        names += [("torchvision", n) for n in tvm.list_models(module=tvm)]
    return [(s, n) for s, n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def is_cnn(row: dict[str, Any]) -> bool:
    """Residual adds, or conv blocks with more than a bare conv: the models retrofit is for."""
    return int(row.get("residual_adds") or 0) > 0 or int(row.get("cnn_blocks") or 0) > 0


def _pct(n: int, d: int) -> str:
    return f"{n} ({100.0 * n / d:.2f}%)" if d else "0"


def write_summary(rows: list[dict[str, Any]], out: Path, command: str, seconds: float | None = None) -> None:
    with_sites = [r for r in rows if r.get("status") != "no sites"]
    in_place = any(r.get("status") == "ok" and str(r.get("kc_units", "")) != "" for r in rows)
    title = "# Zoo sweep, keep_class form" if in_place else "# Zoo sweep, GraphModule form"
    lines = [title, "", f"Command: `{command}`", ""]
    if seconds is not None:
        lines += [f"Wall time of the last invocation: {seconds / 60:.1f} min.", ""]
    lines += [
        "Population: models whose analysis finds sites. *CNN* models have residual adds or conv",
        "blocks with a norm, activation or pooling after the conv; the others have only a bare",
        "conv (a transformer's patch embedding); *analysis failed* ones did not get that far.",
        "*Checked* models ran every real-weight check for the attention types the command names",
        "(`--attn`, default se, eca and cbam); *pending* ones were",
        "not reached yet (`--resume` continues); *too big* ones need more memory than the machine",
        "that ran the sweep has (each is listed below with the figures).",
        "",
        "| source | population | models | checked | passed | failed | too big | pending |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    def analysis_failed(r: dict[str, Any]) -> bool:
        return r.get("status") == "fail" and str(r.get("reason", "")).startswith("structure:")

    for source in sorted({r["source"] for r in rows}):
        mine = [r for r in with_sites if r["source"] == source]
        for label, group in (("CNN", [r for r in mine if is_cnn(r) and not analysis_failed(r)]),
                             ("bare conv only", [r for r in mine if not is_cnn(r) and not analysis_failed(r)]),
                             ("analysis failed", [r for r in mine if analysis_failed(r)])):
            if not group:
                continue
            pending = sum(r.get("status") == "pending" for r in group)
            skipped = sum(r.get("status") == "skipped" for r in group)
            checked = len(group) - pending - skipped
            passed = sum(r.get("status") == "ok" for r in group)
            lines.append(f"| {source} | {label} | {len(group)} | {checked} | {_pct(passed, checked)} | "
                         f"{checked - passed} | {skipped} | {pending} |")
        lines.append(f"| {source} | no sites | {sum(r['source'] == source and r.get('status') == 'no sites' for r in rows)}"
                     " | | | | | |")
    lines += ["", "## By family", "",
              "| source | family | models | with sites | passed | failed | too big | pending |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by_family: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_family.setdefault((r["source"], r.get("family", "")), []).append(r)
    for (source, fam), rs in sorted(by_family.items()):
        ws = [r for r in rs if r.get("status") != "no sites"]
        ok = sum(r.get("status") == "ok" for r in ws)
        pending = sum(r.get("status") == "pending" for r in ws)
        skipped = sum(r.get("status") == "skipped" for r in ws)
        lines.append(f"| {source} | {fam} | {len(rs)} | {len(ws)} | {ok} | {len(ws) - ok - pending - skipped} | "
                     f"{skipped} | {pending} |")
    kept = [r for r in rows if r.get("status") == "ok" and str(r.get("kc_units", "")) != ""]
    if kept:
        adds = sum(int(r["kc_adds"]) for r in kept)
        in_block = sum(int(r["kc_adds_in_block"]) for r in kept)
        reach = [r for r in kept if int(r["kc_out_of_reach"])]
        lines += ["", "## keep_class: rewritten in place", "",
                  f"{len(kept)} models passed with `keep_class=True`; their SE retrofits rewrote "
                  f"{sum(int(r['kc_units']) for r in kept):,} units in place, each keeping its class. Of "
                  f"{adds:,} SE modules at residual adds, {_pct(in_block, adds)} went into the add's own block "
                  "(the smallest unit); the others into a larger module whose block does not trace alone.",
                  f"{len(reach)} models have sites the rules select in their own forward, out of reach with "
                  "keep_class:", ""]
        lines += [f"- `{r['source']}:{r['model']}`: {r['kc_out_of_reach']}" for r in reach] or ["none"]
        below = [r for r in kept if int(r["kc_adds_in_block"]) < int(r["kc_adds"])]
        lines += ["", f"Models with residual adds rewritten in a larger unit ({len(below)}):", ""]
        lines += [f"- `{r['source']}:{r['model']}`: {r['kc_adds_in_block']} of {r['kc_adds']} in their block"
                  for r in below] or ["none"]
    partial = [r for r in rows if r.get("partial")]
    lines += ["", f"## Partial path ({len(partial)}): models that do not trace as a whole", ""]
    lines += [f"- `{r['source']}:{r['model']}` ({r.get('status')}): left alone: {r['partial']}" for r in partial] or [
        "none"]
    fails = [r for r in rows if r.get("status") not in ("ok", "no sites", "pending")]
    lines += ["", f"## Not passed ({len(fails)})", ""]
    def why(r: dict[str, Any]) -> str:
        if not r.get("reason") and str(r.get("kc_out_of_reach") or "0") != "0":
            return (f"the {r['kc_out_of_reach']} site(s) the rules select are in forward code kept as Python, out of "
                    "reach with keep_class")
        return str(r.get("reason", ""))

    lines += [f"- `{r['source']}:{r['model']}` ({r.get('status')}): {why(r)}" for r in fails] or ["none"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _read(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    if not path.exists():
        return {}
    return {(r["source"], r["model"]): r for r in csv.DictReader(path.open())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("timm", "torchvision", "all"), default="all")
    p.add_argument("--filter", nargs="+", default=["*"], help="fnmatch globs on model names (a model matching any is swept)")
    p.add_argument("--size", type=int, default=96, help="input size for the real checks (fixed-size models use theirs)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model and pass")
    p.add_argument("--workers", type=int, default=2, help="worker processes (one torch thread each)")
    p.add_argument("--native-size", action="store_true",
                   help="build timm models made for a fixed input size at that size (default: img_size=--size "
                        "where the constructor takes it)")
    p.add_argument("--big", type=float, default=300e6, help="parameters above which a model runs alone, batch 1")
    p.add_argument("--out", default="docs/zoo", help="folder for results.csv, structure.csv and summary.md")
    p.add_argument("--cnn-only", action="store_true",
                   help="check only the CNN population (residual adds or conv blocks with a norm, activation or pool)")
    p.add_argument("--keep-class", action="store_true",
                   help="check retrofit(..., keep_class=True): units rewritten in place, each with its own class")
    p.add_argument("--resume", action="store_true", help="keep the rows already written; sweep the rest")
    p.add_argument("--redo-failed", action="store_true", help="with --resume: sweep the failed models again")
    p.add_argument("--redo", metavar="GLOB", help="with --resume: sweep again the models matching GLOB "
                                                  "(fnmatch on names; e.g. after a fix)")
    p.add_argument("--keep-analysis", action="store_true",
                   help="with --resume: keep the structure rows of models not checked yet (default: analyse again)")
    p.add_argument("--summary-only", action="store_true",
                   help="write summary.md from the CSV files (and leave one row per model in results.csv), run nothing")
    p.add_argument("--command", help="with --summary-only: the sweep command(s) to name in the summary")
    p.add_argument("--attn", nargs="+", choices=ATTNS, default=list(ATTNS),
                   help="attention types to check (default all three; a keep_class pass needs se, whose retrofit "
                        "gives the in-place figures)")
    args = p.parse_args(argv)
    attns = tuple(args.attn)
    if args.keep_class and "se" not in attns:
        p.error("--keep-class needs se among --attn: the in-place figures come from the SE retrofit")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = model_list(args.source, args.filter)
    fam = families()
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    if args.summary_only and args.command:
        command = args.command
    csv_path, structure_path = out / "results.csv", out / "structure.csv"
    keep = args.resume or args.summary_only
    structure_rows = _read(structure_path) if keep else {}
    done = _read(csv_path) if keep else {}
    previous = dict(done)
    if args.resume and not args.keep_analysis:
        # A model not checked yet is analysed again, by the code that will check it.
        structure_rows = {k: r for k, r in structure_rows.items() if r["status"] != "pending" or k in done}
    if args.redo_failed:
        done = {k: r for k, r in done.items() if r["status"] != "fail"}
        structure_rows = {k: r for k, r in structure_rows.items() if r["status"] != "fail"}
    if args.redo:
        again = {k for k in {**done, **structure_rows} if fnmatch.fnmatchcase(k[1], args.redo)}
        done = {k: r for k, r in done.items() if k not in again}
        structure_rows = {k: r for k, r in structure_rows.items() if k not in again}
    shrink = not args.native_size
    start = time.perf_counter()
    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def family(row: dict[str, Any]) -> dict[str, Any]:
        row["family"] = fam.get(row["model"], "torchvision") if row["source"] == "timm" else "torchvision"
        return row

    if not args.summary_only:
        pool = Pool(args.workers, args.timeout)
        with open(csv_path, "a" if done else "w", newline="") as f, \
                open(structure_path, "a" if structure_rows else "w", newline="") as sf:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            swriter = csv.DictWriter(sf, fieldnames=FIELDS, extrasaction="ignore")
            if not done:
                writer.writeheader()
            if not structure_rows:
                swriter.writeheader()

            def finish(row: dict[str, Any]) -> None:
                writer.writerow(family(row))
                f.flush()
                print(f"[{time.perf_counter() - start:7.0f}s] {len(done) + len(rows)}/{len(names)} "
                      f"{row['source']}:{row['model']} {row.get('status')} {row.get('reason', '')}", flush=True)

            todo = [(s, n) for s, n in names if (s, n) not in done and (s, n) not in structure_rows]
            for k, (_job, row) in enumerate(pool.run([("structure", s, n, args.size, 2, False, False, False, ())
                                                     for s, n in todo]), 1):
                swriter.writerow(family(row))
                sf.flush()
                structure_rows[(row["source"], row["model"])] = row
                print(f"[{time.perf_counter() - start:7.0f}s] structure {k}/{len(todo)} {row['source']}:{row['model']}"
                      f" {row.get('status')} {row.get('reason', '')}", flush=True)
                if row.get("status") != "pending":
                    rows[(row["source"], row["model"])] = row
                    finish(row)
            pending = sorted((r for k, r in structure_rows.items() if r.get("status") == "pending"
                              and k not in done and k not in rows and k in set(names)),
                             key=lambda r: int(r["params"]))
            cnn = [r for r in pending if is_cnn(r)]
            bare = [r for r in pending if not is_cnn(r)]
            # Smallest first, CNNs (what retrofit is for) before bare-conv models; big models
            # alone at the end (memory).
            groups = [(g, big, workers, 1 if big else b2) for big, workers in ((False, args.workers), (True, 1))
                      for g, b2 in ((cnn, 2), (bare, 1))]
            if args.cnn_only:
                groups = [g for g in groups if g[0] is cnn]
            for group, big, workers, batch in groups:
                chosen = [r for r in group if (int(r["params"]) > args.big) == big]
                base = {(r["source"], r["model"]): r for r in chosen}
                jobs = [("check", r["source"], r["model"], args.size, batch, shrink, big, args.keep_class, attns)
                        for r in chosen]
                for _job, row in pool.run(jobs, workers):
                    key = (row["source"], row["model"])
                    rows[key] = {**base[key], **row}
                    finish(rows[key])
        pool.close()
    every = {**structure_rows, **done, **rows}
    for key, row in structure_rows.items():
        # An analysis failure later redone with success (--redo-failed, still running or
        # interrupted) is superseded by its newer structure row.
        old = every[key]
        if old.get("status") == "fail" and str(old.get("reason", "")).startswith("structure:") \
                and row.get("status") != "fail":
            every[key] = row
    ordered = [family(every[(s, n)]) for s, n in names if (s, n) in every]
    if not args.summary_only or csv_path.exists():
        # Rows were appended as models finished (an interrupted sweep leaves a model's older
        # rows); leave one row per model, in registry order.
        finished = [r for r in ordered if r.get("status") != "pending"]
        listed = set(names)
        finished += [r for k, r in previous.items() if k not in listed]  # outside --source/--filter: kept
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(finished)
    write_summary(ordered, out, command, None if args.summary_only else time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
