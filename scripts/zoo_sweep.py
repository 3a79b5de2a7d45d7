"""Sweep retrofit over timm's and torchvision's registered classification models.

For every model: build it on the meta device and analyse it (structure only). Models with
residual adds or conv blocks are then built for real (``pretrained=False``) and, for each
of ``se``, ``eca`` and ``cbam``, retrofitted and checked:

* identity at init on a real input: max |Δoutput| <= 1e-5 * max(1, max |output|);
* backward works and reaches the new parameters;
* the parameter delta equals the sum of the per-site closed forms;
* the original model is untouched (every tensor and every train/eval flag).

Each model runs in a worker process with a time limit; a crash or a timeout is a recorded
failure, and the sweep goes on. Writes ``results.csv`` and ``summary.md`` (by family,
with every failure and its reason) to ``--out``.

    python scripts/zoo_sweep.py                       # everything (hours on 2 cores)
    python scripts/zoo_sweep.py --filter 'resnet*'    # a slice
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ATTNS = ("se", "eca", "cbam")
FIELDS = ["source", "family", "model", "params", "residual_adds", "conv_blocks", "status",
          *[f"{a}_{k}" for a in ATTNS for k in ("sites", "added", "diff", "seconds")], "reason"]


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


def build(source: str, name: str, device: str | None = None) -> Any:
    import torch

    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **({"device": device} if device else {}))
    import torchvision.models as tvm

    if device:
        with torch.device(device):
            return tvm.get_model(name, weights=None)
    return tvm.get_model(name, weights=None)


def check_model(source: str, name: str, size: int) -> dict[str, Any]:
    import torch

    import retrofit

    torch.manual_seed(0)
    row: dict[str, Any] = {"source": source, "model": name}
    meta = build(source, name, "meta")
    row["params"] = sum(p.numel() for p in meta.parameters())
    analysis = retrofit.analyze(meta)
    row["residual_adds"] = len(analysis.of_kind("residual-add"))
    row["conv_blocks"] = len(analysis.of_kind("conv-block"))
    del meta
    if not analysis.sites:
        row["status"] = "no sites"
        return row
    model = build(source, name)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    in_size = tuple(cfg.get("input_size", (3, 224, 224)))
    if not cfg.get("fixed_input_size", False):
        in_size = (in_size[0], size, size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    for attn in ATTNS:
        t0 = time.perf_counter()
        # Stack on attention the model already has, so every site exercises the rewrite.
        gm = retrofit.retrofit(model, attn, input_size=in_size, verify=False, on_existing="stack")
        report = retrofit.get_report(gm)
        x = torch.randn(2, *in_size)
        with torch.no_grad(), retrofit.verify.eval_mode(model, gm):
            want, got = model(x), gm(x)
        leaves = [(w, g) for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got))
                  if isinstance(w, torch.Tensor)]
        diff = max((w.double() - g.double()).abs().max().item() for w, g in leaves)
        scale = max(w.double().abs().max().item() for w, _ in leaves)
        if not diff <= 1e-5 * max(1.0, scale):
            raise AssertionError(f"{attn}: not identity at init, max |Δ| = {diff:.3g} (output scale {scale:.3g})")
        expected = sum(closed_form(attn, r.channels) for r in report.rows)
        if report.params_added != expected:
            raise AssertionError(f"{attn}: parameter delta {report.params_added} != closed form {expected}")
        gm.train()
        out = torch.utils._pytree.tree_leaves(gm(x))
        sum(o.float().mean() for o in out if isinstance(o, torch.Tensor)).backward()
        prefixes = tuple(f"{r.module}." for r in report.rows)
        new = [p for n, p in gm.named_parameters() if n.startswith(prefixes)]
        if any(p.grad is None for p in new):
            raise AssertionError(f"{attn}: backward did not reach every new parameter")
        row[f"{attn}_sites"] = len(report.rows)
        row[f"{attn}_added"] = report.params_added
        row[f"{attn}_diff"] = diff
        row[f"{attn}_seconds"] = round(time.perf_counter() - t0, 2)
        del gm
    if any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()):
        raise AssertionError("the original model's tensors changed")
    if flags != [m.training for m in model.modules()]:
        raise AssertionError("the original model's train/eval flags changed")
    row["status"] = "ok"
    return row


def _worker(conn: Any, size: int) -> None:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    while True:
        job = conn.recv()
        if job is None:
            return
        source, name = job
        try:
            conn.send(check_model(source, name, size))
        except Exception as e:  # a failure of this model, recorded; the sweep goes on
            first = (str(e).strip().splitlines() or [""])[0][:300]
            tb = traceback.extract_tb(e.__traceback__)
            where = f" [{Path(tb[-1].filename).name}:{tb[-1].lineno}]" if tb else ""
            conn.send({"source": source, "model": name, "status": "fail",
                       "reason": f"{type(e).__name__}: {first}{where}"})


def families() -> dict[str, str]:
    import timm

    return {n: m for m in timm.list_modules() for n in timm.list_models(module=m)}


def model_list(source: str, pattern: str) -> list[tuple[str, str]]:
    import timm
    import torchvision.models as tvm

    names: list[tuple[str, str]] = []
    if source in ("timm", "all"):
        names += [("timm", n) for n in timm.list_models()]
    if source in ("torchvision", "all"):
        names += [("torchvision", n) for n in tvm.list_models(module=tvm)]
    return [(s, n) for s, n in names if fnmatch.fnmatchcase(n, pattern)]


def write_summary(rows: list[dict[str, Any]], out: Path, command: str) -> None:
    by_family: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        by_family.setdefault((r["source"], r.get("family", "")), []).append(r)
    with_sites = [r for r in rows if r.get("status") != "no sites"]
    ok = [r for r in with_sites if r.get("status") == "ok"]
    lines = [
        "# Zoo sweep",
        "",
        f"Command: `{command}`",
        "",
        f"Models swept: {len(rows)}; with residual adds or conv blocks: {len(with_sites)}; "
        f"passed every check for se, eca and cbam: {len(ok)} "
        f"({100.0 * len(ok) / max(1, len(with_sites)):.2f}%).",
        "",
        "| source | family | models | with sites | passed | failed |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (source, fam), rs in sorted(by_family.items()):
        ws = [r for r in rs if r.get("status") != "no sites"]
        lines.append(f"| {source} | {fam} | {len(rs)} | {len(ws)} | {sum(r.get('status') == 'ok' for r in ws)} | "
                     f"{sum(r.get('status') == 'fail' for r in ws)} |")
    fails = [r for r in rows if r.get("status") == "fail"]
    lines += ["", f"## Failures ({len(fails)})", ""]
    lines += [f"- `{r['source']}:{r['model']}`: {r.get('reason', '')}" for r in fails] or ["none"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", choices=("timm", "torchvision", "all"), default="all")
    p.add_argument("--filter", default="*", help="fnmatch glob on model names")
    p.add_argument("--size", type=int, default=96, help="input size for the real checks (fixed-size models use theirs)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    p.add_argument("--out", default="docs/zoo", help="folder for results.csv and summary.md")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = model_list(args.source, args.filter)
    fam = families()
    ctx = mp.get_context("spawn")
    rows: list[dict[str, Any]] = []
    conn, proc = None, None
    start = time.perf_counter()
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for i, (source, name) in enumerate(names, 1):
            if proc is None or not proc.is_alive():
                conn, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, args.size), daemon=True)
                proc.start()
            conn.send((source, name))
            if conn.poll(args.timeout):
                try:
                    row = conn.recv()
                except EOFError:
                    row = {"source": source, "model": name, "status": "fail", "reason": "worker died (out of memory?)"}
                    proc = None
            else:
                proc.kill()
                proc.join()
                proc = None
                row = {"source": source, "model": name, "status": "fail", "reason": f"timeout after {args.timeout:.0f}s"}
            if proc is not None and not proc.is_alive():
                proc = None
            row["family"] = fam.get(name, "torchvision") if source == "timm" else "torchvision"
            rows.append(row)
            writer.writerow(row)
            f.flush()
            print(f"[{time.perf_counter() - start:7.0f}s] {i}/{len(names)} {source}:{name} {row.get('status')} "
                  f"{row.get('reason', '')}", flush=True)
    if proc is not None:
        conn.send(None)
        proc.join(timeout=10)
    write_summary(rows, out, "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
