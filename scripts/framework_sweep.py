"""Sweep retrofit over the models of Ultralytics, Hugging Face transformers and
segmentation_models_pytorch, as the timm zoo sweep does over timm and torchvision.

Every model is built from its config with random weights (nothing downloads):

* transformers: every image-classification model class of the installed version, with its
  default config (``num_labels=3``); those with at most one convolution (a transformer's
  patch embedding) are listed and left out of the pass rate;
* smp: every architecture x four encoders (a ResNet, an EfficientNet, a MobileNet, a timm
  ConvNeXt); combinations smp itself refuses to build are listed as such;
* Ultralytics: every model yaml the installed package ships (its smallest scale), which
  covers YOLO v3 to 26 and RT-DETR x the tasks their yamls exist for (detect, segment,
  classify, pose, obb, ...).

For each model, in a worker process with a time limit, and in both forms (the default, and
``keep_class=True``; a model whose forward does not trace as a whole gives the model's class
either way, and is checked once): retrofit ``se`` (or ``--attn NAME``), count the sites reached, require exact
identity (max |Δoutput| == 0 on a probe), run a train step (forward in train mode and
backward reaching every inserted parameter that is used), and save then load again without
``trust_code`` (outputs equal bit for bit).

Writes ``results.csv`` (one row per model, appended as models finish, so ``--resume`` picks
up an interrupted sweep) and ``summary.md``.

    python scripts/framework_sweep.py                    # everything (~1 h on 2 cores)
    python scripts/framework_sweep.py --filter 'yolov8*'  # a slice
    python scripts/framework_sweep.py --attn ema          # another type: docs/frameworks/ema/
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FIELDS = ["framework", "model", "spec", "params", "convs", "status", "form", "input_size", "residual_adds",
          "conv_blocks", "sites", "params_added", "max_abs_diff", "train_step", "round_trip", "seconds", "reason"]
SMP_ENCODERS = ("resnet34", "efficientnet-b0", "mobilenet_v2", "tu-convnext_atto")
NOT_A_CNN = "not a CNN"  # status of models whose only convolution is a patch embedding
REFUSED = "not built"  # status of configurations the library does not build here (the reason says why)


def cases() -> list[tuple[str, str, str, dict[str, Any]]]:
    """``(framework, name, spec, kwargs)`` of every model the sweep covers."""
    out: list[tuple[str, str, str, dict[str, Any]]] = []
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    for classes in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values():
        for cls in (classes,) if isinstance(classes, str) else classes:
            out.append(("transformers", cls, f"transformers:{cls}", {"num_labels": 3}))
    import segmentation_models_pytorch as smp

    archs = sorted(n for n, v in vars(smp).items() if isinstance(v, type) and issubclass(v, smp.base.SegmentationModel)
                   and v is not smp.base.SegmentationModel)
    for arch in archs:
        for encoder in SMP_ENCODERS:
            out.append(("smp", f"{arch}-{encoder}", f"smp:{arch}", {"encoder_name": encoder, "classes": 2}))
    import ultralytics

    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    for yaml in sorted(root.rglob("*.yaml")):
        name = yaml.name
        text = yaml.read_text()
        if "scales:" in text:  # the smallest scale, after the version: yolov8-seg -> yolov8n-seg, yoloe-11 -> yoloe-11n
            first = next(line.split(":")[0].strip() for line in text.split("scales:", 1)[1].splitlines()
                         if line.strip() and not line.strip().startswith("#"))
            # (a yaml named for its scale already, yolov10b.yaml, keeps its name)
            name = re.sub(r"(\d+)(?![\dA-Za-z])", lambda m, s=first: m.group(1) + s, yaml.stem, count=1) + ".yaml"
        out.append(("ultralytics", name, f"ultralytics:{name}", {}))
    return out


def _leaves(out: Any) -> list[Any]:
    import torch

    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _input(model: Any, framework: str) -> tuple[int, int, int]:
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None) if framework == "transformers" else None
    if isinstance(size, (list, tuple)):
        size = size[-1]
    chans = getattr(config, "num_channels", 3) if framework == "transformers" else 3
    # A YOLO's input is a multiple of its largest stride: 64 for the P6 models.
    side = size if isinstance(size, int) and size <= 512 else 256 if framework == "ultralytics" else 224
    return chans if isinstance(chans, int) else 3, side, side


def check(framework: str, name: str, spec: str, kwargs: dict[str, Any], attn: str = "se") -> list[dict[str, Any]]:
    """Every check of one model, in this process; one row per form."""
    import warnings

    import torch
    from torch import nn

    import retrofit

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    base = {"framework": framework, "model": name, "spec": spec}
    try:
        with torch.device("meta"):
            meta = retrofit.create_model(spec, **kwargs)
        convs = sum(isinstance(m, nn.Conv2d) for m in meta.modules())
        params = sum(p.numel() for p in meta.parameters())
        del meta
    except Exception:  # a constructor that needs real values: count on the real model below
        convs = params = None
    try:
        model = retrofit.create_model(spec, **kwargs).eval()
    except Exception as e:  # the library does not build this configuration
        return [{**base, "status": REFUSED, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}]
    if convs is None:
        convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        params = sum(p.numel() for p in model.parameters())
    base.update(params=params, convs=convs)
    if convs <= 1:
        return [{**base, "status": NOT_A_CNN, "reason": f"{convs} convolution(s): a transformer's patch embedding"}]
    size = _input(model, framework)
    x = torch.randn(2, *size)
    rows = []
    for keep_class in (False, True):
        t0 = time.perf_counter()
        row = {**base, "form": "keep_class" if keep_class else "default", "input_size": "x".join(map(str, size))}
        try:
            out = retrofit.retrofit(model, attn, input_size=size, keep_class=keep_class)
            report = retrofit.get_report(out)
            analysis = retrofit.analyze(model, size, keep_class=keep_class)
            row.update(residual_adds=len(analysis.of_kind("residual-add")),
                       conv_blocks=len(analysis.of_kind("conv-block")), sites=len(report.rows),
                       params_added=report.params_added, max_abs_diff=report.max_abs_diff)
            if report.max_abs_diff != 0.0:
                raise AssertionError(f"not an exact identity at init: max |Δ| = {report.max_abs_diff}")
            # A train step: forward in train mode, backward from every output.
            prefixes = tuple(f"{r.module}." for r in report.rows)
            out.train()
            loss = sum(t.float().mean() for t in _leaves(out(x)) if t.is_floating_point())
            loss.backward()
            new = [p for n, p in out.named_parameters() if n.startswith(prefixes)]
            reached = sum(p.grad is not None for p in new)
            row["train_step"] = f"{reached}/{len(new)}"
            if new and reached == 0:
                raise AssertionError("backward reached no inserted parameter")
            out.eval()
            with torch.no_grad():
                for p in out.parameters():  # away from identity, as fine-tuning would
                    p.add_(torch.randn_like(p) * 1e-3)
                want = _leaves(out(x))
            with tempfile.TemporaryDirectory() as tmp:
                retrofit.save(out, Path(tmp) / "save")
                back = retrofit.load(Path(tmp) / "save").eval()
                with torch.no_grad():
                    got = _leaves(back(x))
            same = len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
            row["round_trip"] = "equal" if same else "differs"
            if not same:
                raise AssertionError("the loaded model's outputs differ from the saved model's")
            row["status"] = "ok" if report.rows else "nothing selected"
        except Exception as e:  # a failure of this model and form, recorded
            row.update(status="fail", reason=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        if not keep_class and row["status"] != "fail" and not isinstance(out, torch.fx.GraphModule):
            rows[-1]["form"] = "both (does not trace as a whole)"
            break
    return rows


def run_one(case: tuple[str, str, str, dict[str, Any]], timeout: float, attn: str) -> list[dict[str, Any]]:
    """One model in a fresh process (a crash or a timeout is that model's failure)."""
    framework, name, spec, kwargs = case
    env = {**os.environ, "YOLO_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    try:
        r = subprocess.run([sys.executable, __file__, "--one", json.dumps(case), "--attn", attn], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"framework": framework, "model": name, "spec": spec, "status": "fail",
                 "reason": f"timeout after {timeout:.0f} s"}]
    lines = [line for line in r.stdout.splitlines() if line.startswith("ROW ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or [""])[-1][:300]
        return [{"framework": framework, "model": name, "spec": spec, "status": "fail",
                 "reason": f"worker exit {r.returncode}: {tail}"}]
    return [json.loads(line[4:]) for line in lines]


def _counted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] not in (NOT_A_CNN, REFUSED)]


def write_summary(rows: list[dict[str, Any]], out: Path, command: str, attn: str) -> None:
    import segmentation_models_pytorch
    import transformers
    import ultralytics
    from tabulate import tabulate

    import retrofit

    counted = _counted(rows)
    passed = [r for r in counted if r["status"] in ("ok", "nothing selected")]
    title = "Framework sweep" if attn == "se" else f"Framework sweep with {attn}"
    lines = [f"# {title}", "", f"Command: `{command}`", "",
             f"retrofit {retrofit.__version__}, ultralytics {ultralytics.__version__}, transformers "
             f"{transformers.__version__}, segmentation-models-pytorch {segmentation_models_pytorch.__version__}; "
             f"random weights, built from configs; `{attn}` rules.", "",
             "Each row is one model in one form (`default`, `keep_class`; `both` when the model does not trace as a "
             "whole and both forms give its class). Checks: exact identity at init (max |Δoutput| == 0), a train "
             "step (backward reaches the inserted parameters; `k/n` of them get a gradient), and save then load "
             "without trust_code (outputs equal bit for bit).", "",
             f"**{len(passed)} of {len(counted)} checks pass ({100 * len(passed) / max(len(counted), 1):.1f}%).**", ""]
    by = ["framework", "checks", "pass", "fail", "not a CNN", "not built"]
    table = []
    for fw in ("ultralytics", "transformers", "smp"):
        mine = [r for r in rows if r["framework"] == fw]
        c = _counted(mine)
        table.append([fw, len(c), sum(r["status"] in ("ok", "nothing selected") for r in c),
                      sum(r["status"] == "fail" for r in c), len({r["model"] for r in mine if r["status"] == NOT_A_CNN}),
                      len({r["model"] for r in mine if r["status"] == REFUSED})])
    lines += [tabulate(table, headers=by, tablefmt="github"), ""]
    fails = [r for r in counted if r["status"] == "fail"]
    lines += ["## Failures", ""]
    lines += [f"- {r['framework']} `{r['model']}` ({r.get('form') or 'build'}): {r['reason']}" for r in fails] or ["None."]
    lines += ["", "## Every model", ""]
    cols = ["framework", "model", "form", "status", "input_size", "residual_adds", "conv_blocks", "sites",
            "params_added", "max_abs_diff", "train_step", "round_trip", "seconds"]
    lines += [tabulate([[r.get(c, "") if r.get(c, "") is not None else "" for c in cols] for r in rows], headers=cols,
                       tablefmt="github"), ""]
    other = [r for r in rows if r["status"] in (NOT_A_CNN, REFUSED)]
    if other:
        lines += ["## Left out of the pass rate", ""]
        lines += [f"- {r['framework']} `{r['model']}`: {r['status']}: {r.get('reason', '')}" for r in other]
        lines += [""]
    out.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attn", default="se", help="attention type or built-in rule set (default: se)")
    p.add_argument("--out", type=Path, help="default: docs/frameworks, or docs/frameworks/ATTN for another type")
    p.add_argument("--filter", nargs="+", default=["*"], help="fnmatch globs on the model name (a model matching any is swept)")
    p.add_argument("--resume", action="store_true", help="keep rows already in results.csv")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        for row in check(*json.loads(args.one), attn=args.attn):
            print("ROW " + json.dumps(row), flush=True)
        return
    args.out = args.out or Path("docs/frameworks") / ("" if args.attn == "se" else args.attn)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    done: list[dict[str, Any]] = []
    if (args.resume or args.summary_only) and results.exists():
        with results.open() as f:
            done = [{k: (v if v != "" else None) for k, v in r.items()} for r in csv.DictReader(f)]
    todo = [c for c in cases() if any(fnmatch.fnmatchcase(c[1], f) for f in args.filter)
            and c[1] not in {r["model"] for r in done}]
    if not args.summary_only:
        if not results.exists() or not args.resume:
            with results.open("w", newline="") as f:
                csv.DictWriter(f, FIELDS).writeheader()
            done = []
        with ThreadPoolExecutor(args.workers) as pool:
            for rows in pool.map(lambda c: run_one(c, args.timeout, args.attn), todo):
                with results.open("a", newline="") as f:
                    csv.DictWriter(f, FIELDS, extrasaction="ignore").writerows(rows)
                done += rows
                for r in rows:
                    print(f"{r['framework']:12} {r['model']:45} {r.get('form') or '':10} {r['status']:16} "
                          f"{r.get('reason') or ''}"[:200], flush=True)
    order = {c[1]: i for i, c in enumerate(cases())}
    done.sort(key=lambda r: order.get(r["model"], 0))
    command = "python scripts/framework_sweep.py" + (f" --attn {args.attn}" if args.attn != "se" else "")
    command += " --filter " + " ".join(f"'{f}'" for f in args.filter) if args.filter != ["*"] else ""
    write_summary(done, args.out / "summary.md", command, args.attn)


if __name__ == "__main__":
    main()
