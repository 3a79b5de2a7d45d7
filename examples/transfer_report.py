"""Write the transfer experiments' page from their unit files: nothing in it is typed by hand.

    python examples/transfer_report.py     # docs/experiments/transfer.md, its figures, and the README's summary

Reads the classification run (``examples/transfer.py``, default ``docs/transfer/classification``)
and the detection run (``examples/yolo_transfer.py``, default ``docs/transfer/detection``):
their ``settings.json`` and ``units/*.json``. Writes the page (method, tables, the reading
computed from the numbers, the gate figures, the time each unit took), each run's
``results.json``, and the block of the README between the ``transfer-summary`` markers.
``examples/transfer_real.py`` uses the same functions for the real-scale runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# isort: split
from transfer_stats import LEVEL, paired  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README_BEGIN = "<!-- transfer-summary: written by examples/transfer_report.py from the unit files -->"
README_END = "<!-- /transfer-summary -->"
# A gate whose mean |g - 1| (or added ratio) stays below this, averaged over its sites and
# seeds, is reported as not having moved from identity: carried along, not tested.
STILL = 0.01

METRICS = {"test_acc": ("test accuracy (%)", 100.0, "points", 2),
           "map_test": ("test mAP50-95", 1.0, "mAP50-95", 4)}


# --------------------------------------------------------------------------- numbers


def by_seed(units: Sequence[dict[str, Any]], key: str) -> dict[int, float]:
    return {u["seed"]: u[key] for u in units if u.get(key) is not None}


def mean_sd(values: Sequence[float], scale: float, digits: int) -> str:
    if not values:
        return "–"
    m = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def movement(units: Sequence[dict[str, Any]], key: str = "gates") -> tuple[float, float, str] | None:
    """(mean over sites and seeds of the site means, largest site p95, kind) of a variant's
    gate records; None when it has none."""
    means, p95s, kinds = [], [], set()
    for u in units:
        sites = [g for g in (u.get(key) or []) if g["kind"] != "none"]
        if sites:
            means.append(statistics.fmean(g["mean"] for g in sites))
            p95s.append(max(g["p95"] for g in sites))
            kinds |= {g["kind"] for g in sites}
    if not means:
        return None
    return statistics.fmean(means), max(p95s), "/".join(sorted(kinds))


def per_site(units: Sequence[dict[str, Any]], key: str = "gates") -> list[tuple[str, float]]:
    """(site path, mean over seeds of its mean movement), in graph order."""
    sites: dict[str, list[float]] = {}
    for u in units:
        for g in u.get(key) or []:
            if g["kind"] != "none":
                sites.setdefault(g["path"], []).append(g["mean"])
    return [(path, statistics.fmean(v)) for path, v in sites.items()]


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Per size and variant: the paired comparison with plain, the identity check, gate
    movement and time. Added to ``res`` as ``summary``."""
    metric = res["metric"]
    out: dict[str, Any] = {}
    for size, block in res["sizes"].items():
        plain = by_seed(block["rows"].get("plain", {}).get("units", []), metric)
        rows = {}
        for name, row in block["rows"].items():
            units = row["units"]
            p = None if name == "plain" else paired(by_seed(units, metric), plain)
            rows[name] = {
                "seeds": sorted(u["seed"] for u in units),
                "paired": None if p is None else p.to_dict(),
                "equal_at_insertion": [u["equal_to_plain_at_insertion"] for u in units
                                       if u["equal_to_plain_at_insertion"] is not None],
                "movement": movement(units), "movement_at_insertion": movement(units, "gates_at_insertion"),
                "seconds": [u["seconds"] for u in units], "cpu_seconds": [u.get("cpu_seconds") for u in units],
            }
        out[size] = rows
    res["summary"] = out
    return res


# --------------------------------------------------------------------------- text


def _interval(p: dict[str, Any] | None, scale: float, digits: int) -> str:
    if p is None:
        return "–"
    if p["n"] < 2:
        return f"{p['mean'] * scale:+.{digits}f} (1 seed)"
    return (f"{p['mean'] * scale:+.{digits}f} [{p['low'] * scale:+.{digits}f}, {p['high'] * scale:+.{digits}f}]")


def _gate_cell(m: tuple[float, float, str] | None) -> str:
    if m is None:
        return "–"
    what = {"gate": r"\|g−1\|", "added": "‖Δ‖/‖x‖"}.get(m[2], m[2])  # escaped: inside a table
    return f"{what} {m[0]:.3f} (p95 ≤ {m[1]:.3f})"


def _is_identity(name: str, row: dict[str, Any]) -> bool:
    units = row["units"]
    return name != "plain" and bool(units) and all(u.get("gate", "identity") == "identity" for u in units)


def table(res: dict[str, Any], size: str) -> list[str]:
    label, scale, unit, digits = METRICS[res["metric"]]
    block, summ = res["sizes"][size], res["summary"][size]
    head = ["| variant | params added | attention lr (chosen on val, seed 0) | equal to plain at insertion | "
            f"{label}, mean ± std | Δ vs plain ({unit}), mean [{LEVEL:.0%} CI] | seeds better | verdict | "
            "gate movement after training | CPU s / run |", "| --- | ---: | --- | --- | ---: | ---: | ---: | --- | --- | ---: |"]
    for name, row in block["rows"].items():
        s = summ[name]
        units = row["units"]
        if not units:
            head.append(f"| {row['label']} | – | – | – | – | – | – | not run yet | – | – |")
            continue
        p = s["paired"]
        eq = s["equal_at_insertion"]
        equal = f"{sum(eq)} of {len(eq)} seeds" if name != "plain" else "–"
        added = f"{units[0]['params_added']:,}"
        mult = "–" if row["attn_lr_mult"] is None else f"×{row['attn_lr_mult']:g}"
        better = "–" if p is None else f"{p['better']} of {p['n']}"
        verdict = "–" if p is None else p["verdict"]
        cpu = [c for c in s["cpu_seconds"] if c is not None]
        secs = f"{statistics.fmean(cpu):.0f}" if cpu else f"{statistics.fmean(s['seconds']):.0f} (wall)"
        head.append(f"| {row['label']} | {added} | {mult} | {equal} | "
                    f"{mean_sd([u[res['metric']] for u in units], scale, digits)} | {_interval(p, scale, digits)} | "
                    f"{better} | {verdict} | {_gate_cell(s['movement'])} | {secs} |")
    return head


def per_seed_table(res: dict[str, Any], size: str) -> list[str]:
    _, scale, _, digits = METRICS[res["metric"]]
    seeds = res["settings"]["seeds"]
    out = ["| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "| --- |" + " ---: |" * len(seeds)]
    for row in res["sizes"][size]["rows"].values():
        got = by_seed(row["units"], res["metric"])
        out.append(f"| {row['label']} | " + " | ".join(f"{got[s] * scale:.{digits}f}" if s in got else "–"
                                                       for s in seeds) + " |")
    return out


def selection_table(res: dict[str, Any], size: str) -> list[str]:
    mults = res["settings"]["attn_lr_mults"]
    score = "val accuracy (%)" if res["metric"] == "test_acc" else "val mAP50-95"
    scale, digits = (100.0, 2) if res["metric"] == "test_acc" else (1.0, 4)
    out = ["| variant | " + " | ".join(f"×{m:g}: {score}" for m in mults) + " | chosen |",
           "| --- |" + " ---: |" * len(mults) + " --- |"]
    for name, row in res["sizes"][size]["rows"].items():
        if name == "plain":
            continue
        sel = row["selection"] or {}
        cells = [f"{sel[f'x{m:g}'] * scale:.{digits}f}" if f"x{m:g}" in sel else "–" for m in mults]
        chosen = "pending" if row["attn_lr_mult"] is None else f"×{row['attn_lr_mult']:g}"
        out.append(f"| {row['label']} | " + " | ".join(cells) + f" | {chosen} |")
    return out


def reading(res: dict[str, Any], size: str, size_label: str) -> list[str]:
    """What one size's table says, from its numbers."""
    _, scale, unit, digits = METRICS[res["metric"]]
    rows, summ = res["sizes"][size]["rows"], res["summary"][size]
    lines = []
    verdicts: dict[str, list[str]] = {"pays": [], "hurts": [], "noise": [], "too few seeds": []}
    for name, row in rows.items():
        p = summ[name]["paired"]
        if p is not None:
            verdicts[p["verdict"]].append(f"{row['label']} ({_interval(p, scale, digits)} {unit}, "
                                          f"better on {p['better']} of {p['n']} seeds)")
    for verdict, what in (("pays", "Pays (the whole interval above zero)"),
                          ("hurts", "Hurts (the whole interval below zero)"),
                          ("noise", "Noise (the interval holds zero)")):
        lines.append(f"- {size_label}: {what}: " + ("; ".join(verdicts[verdict]) or "none") + ".")
    if verdicts["too few seeds"]:
        lines.append(f"- {size_label}: one seed so far, no interval: " + "; ".join(verdicts["too few seeds"]) + ".")
    identity = [n for n, r in rows.items() if _is_identity(n, r)]
    eq = [e for n in identity for e in summ[n]["equal_at_insertion"]]
    if eq:
        lines.append(f"- {size_label}: identity insertion equals plain fine-tuning's start, bit for bit, in "
                     f"{sum(eq)} of {len(eq)} runs" + ("." if all(eq) else ": **not in every run**."))
    key = "val_acc_at_insertion" if res["metric"] == "test_acc" else "map_val_at_insertion"
    start = [u[key] for u in rows.get("plain", {}).get("units", []) if u.get(key) is not None]
    for name, row in rows.items():
        if name != "plain" and row["units"] and not _is_identity(name, row) and start:
            theirs = [u[key] for u in row["units"] if u.get(key) is not None]
            if theirs:
                lines.append(f"- {size_label}: {row['label']} at insertion, before any step: validation "
                             f"{statistics.fmean(theirs) * scale:.{digits}f} against plain fine-tuning's start "
                             f"{statistics.fmean(start) * scale:.{digits}f} (mean over seeds).")
    still = [rows[n]["label"] for n in identity if summ[n]["movement"] is not None and summ[n]["movement"][0] < STILL]
    if still:
        lines.append(f"- {size_label}: gates still within {STILL} of identity after training (carried along, not "
                     "tested): " + "; ".join(still) + ".")
    return lines


def source_line(res: dict[str, Any]) -> str:
    src = res.get("source")
    if not src:
        return "Source model: pending."
    if "description" in src:  # a given model (the real-scale runs), not one trained here
        return f"Source model: {src['description']}."
    if res["metric"] == "test_acc":
        return (f"Source model: {src['train_images']:,} training images of the source classes, {src['epochs']} "
                f"epochs; test accuracy on the source classes {100 * src['test_acc']:.2f}%.")
    return (f"Source model: YOLOv8n from scratch, {src['train_canvases']:,} source canvases, {src['epochs']} epochs; "
            f"source val / test mAP50-95 {src['map_val']:.4f} / {src['map_test']:.4f}.")


def progress(res: dict[str, Any]) -> tuple[int, int]:
    """(units done, units planned) of a run, the source model's included."""
    s = res["settings"]
    attn = [n for n in res["variants"] if n != "plain"]
    per_size = len(s["seeds"]) * (1 + len(attn)) + len(attn) * (len(s["attn_lr_mults"]) - 1)
    done = 1 if res.get("source") else 0
    for block in res["sizes"].values():
        for name, row in block["rows"].items():
            done += len(row["units"])
            if name != "plain" and row["selection"]:
                done += len(row["selection"]) - (1 if row["attn_lr_mult"] is not None else 0)
    return done, 1 + per_size * len(s["sizes"])


# --------------------------------------------------------------------------- figures


def plot_gates(res: dict[str, Any], path: Path, size_label: Any) -> bool:
    """Mean movement from identity per site (mean over seeds), one panel per size, one line
    per variant; False when there is nothing to draw."""
    data = {size: {row["label"]: sites for name, row in block["rows"].items()
                   if name != "plain" and (sites := per_site(row["units"]))}
            for size, block in res["sizes"].items()}
    sizes = [size for size, lines in data.items() if lines]
    if not sizes:
        return False
    fig, axes = plt.subplots(1, len(sizes), figsize=(max(9.0, 6.5 * len(sizes)), 4.6), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for label, sites in data[size].items():
            ax.plot(range(len(sites)), [max(v, 1e-7) for _, v in sites], marker="o", ms=3, lw=1.2, label=label)
        ax.set_yscale("log")
        ax.axhline(STILL, color="gray", ls=":", lw=0.8)
        ax.set(title=f"{size_label(size)}", xlabel="site, in graph order (input → output)",
               ylabel="mean |g − 1| (gates) or ‖Δ‖/‖x‖ (added)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{res['experiment']}: how far the inserted modules moved from identity after fine-tuning\n"
                 f"(test images; mean over seeds; dotted: {STILL}, below which a gate counts as not moved)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- the page


def size_labeller(res: dict[str, Any]) -> Any:
    if res["metric"] == "test_acc":
        return lambda size: f"{int(size):,} images per class"
    return lambda size: f"{int(size):,} training canvases"


def section(res: dict[str, Any], title: str, figure: Path | None, page_dir: Path) -> list[str]:
    label = size_labeller(res)
    done, total = progress(res)
    s = res["settings"]
    lines = [f"## {title}", "", f"{done} of {total} runs done" + (" (complete)." if done >= total else
                                                                  f": **partial**; `{res['command']}` continues."),
             "", source_line(res), ""]
    if res.get("left_out"):
        lines += [f"Left out: {k}: {v}." for k, v in res["left_out"].items()] + [""]
    for size in res["sizes"]:
        lines += [f"### {label(size)}, {res['sizes'][size]['epochs']} epochs, seeds {s['seeds']}", "",
                  *table(res, size), "", *reading(res, size, label(size)), "",
                  "Attention learning rate, chosen on the validation split with seed 0:", "",
                  *selection_table(res, size), ""]
    if figure is not None:
        lines += [f"![gate movement per site]({_rel(figure, page_dir)})", ""]
    lines += ["Every seed:", ""]
    for size in res["sizes"]:
        lines += [f"{label(size)}:", "", *per_seed_table(res, size), ""]
    return lines


def _rel(path: Path, page_dir: Path) -> str:
    import os

    return os.path.relpath(path, page_dir).replace(os.sep, "/")


def hours(res: dict[str, Any]) -> tuple[float, float]:
    """(CPU hours, wall hours) of a run's units."""
    cpu = wall = 0.0
    for block in res["sizes"].values():
        for row in block["rows"].values():
            for u in row["units"]:
                wall += u["seconds"]
                cpu += u.get("cpu_seconds") or u["seconds"]
    src = res.get("source") or {}
    return (cpu + (src.get("cpu_seconds") or src.get("seconds") or 0)) / 3600, \
        (wall + (src.get("seconds") or 0)) / 3600


def summary_line(results: Sequence[dict[str, Any]]) -> str:
    """The README's one paragraph on transfer, computed."""
    parts = []
    for res in results:
        label = size_labeller(res)
        done, total = progress(res)
        for size, rows in res["summary"].items():
            by: dict[str, list[str]] = {"pays": [], "hurts": [], "noise": [], "too few seeds": []}
            for n, r in rows.items():
                if r["paired"]:
                    by[r["paired"]["verdict"]].append(res["sizes"][size]["rows"][n]["label"])
            if not any(row["units"] for row in res["sizes"].get(size, {}).get("rows", {}).values()):
                parts.append(f"{res['experiment']}, {label(size)}: not run yet")
                continue
            noise = len(by["noise"])
            if by["pays"] or by["hurts"]:
                # labels hold commas ("CBAM, identity"): " + " between them
                text = (f"pays: {' + '.join(by['pays']) or 'none'}; hurts: {' + '.join(by['hurts']) or 'none'}; "
                        f"noise: {f'the other {noise}' if noise else 'none'}")
            else:
                text = f"none pays or hurts ({noise} variant{'s' * (noise != 1)}, every interval holds zero)"
            few = len(by["too few seeds"])
            parts.append(f"{res['experiment']}, {label(size)}: {text}"
                         + (f"; one seed so far: {few} variant{'s' * (few != 1)}" if few else ""))
        if done < total:
            parts[-1] += f" ({done} of {total} runs so far)"
    return ("In transfer (a network pretrained on other classes, fine-tuned on new ones; "
            f"a variant pays only when the {LEVEL:.0%} interval of its paired difference to plain fine-tuning "
            "excludes zero): " + "; ".join(parts) + ".")


REAL_SCALE = [
    "## At real scale", "",
    "The same variants, seeds, attention-lr choice, statistics and page, on a machine with a GPU, the weights and "
    "the data (`examples/transfer_real.py`; nothing is downloaded: a missing `yolov8n.pt` or ImageNet weights stop "
    "it at once with one line):", "",
    "```bash",
    "python examples/transfer_real.py detect --weights yolov8n.pt --data VOC.yaml --sizes 500 5000 --epochs 50 20 \\",
    "    --imgsz 640 --batch 32 --device 0 --workers 8 --out runs/transfer-real/detection",
    "python examples/transfer_real.py classify --model resnet50 --pretrained --data DIR --sizes 10 100 \\",
    "    --epochs 30 15 --workers 8 --out runs/transfer-real/classification     # DIR/train, DIR/val, DIR/test",
    "python examples/transfer_real.py report --detection runs/transfer-real/detection \\",
    "    --classification runs/transfer-real/classification --page runs/transfer-real/transfer.md",
    "```", "",
    "Detection takes any Ultralytics data yaml (its images and labels on disk); the validation split the attention "
    "lr is chosen on is carved out of its training images, and its test split (its val where it has none) is the "
    "test split. `--resume` continues a stopped run. The examples test marker runs the script end to end on a few "
    "images with random weights.", "",
]


def write_page(results: dict[str, dict[str, Any]], page: Path, figures: Path) -> str:
    """The page from the runs (``{"classification": res, "detection": res}``, either may be
    missing); returns the README's summary line."""
    text = ["# Transfer: where retrofitted attention is said to pay", "",
            "Written by `examples/transfer_report.py` from the unit files of `examples/transfer.py` and "
            "`examples/yolo_transfer.py`; nothing here is typed by hand.", ""]
    text += method(results)
    for kind, title in (("classification", "Classification: the residual CNN, Fashion-MNIST classes 5-9"),
                        ("detection", "Detection: YOLOv8n, canvases of Fashion-MNIST classes 5-9")):
        res = results.get(kind)
        if res is None:
            text += [f"## {title}", "", "No run yet.", ""]
            continue
        fig = figures / f"gates-{kind}.png"
        drawn = plot_gates(res, fig, size_labeller(res))
        text += section(res, title, fig if drawn else None, page.parent)
    text += ["## Time", ""]
    for kind, res in results.items():
        cpu, wall = hours(res)
        text.append(f"- {kind}: {cpu:.2f} CPU hours in all (one thread per run), {wall:.2f} hours of wall time on a "
                    "2-core machine shared with other work. The CPU s / run column is the CPU time of one "
                    "fine-tuning run, measurement included.")
    text += ["", "Units ran one or two at a time on the two cores, beside other work, so the CPU time of a run "
             "varies with the load: differences between variants in that column are not a measure of their cost "
             "([attention types compared on ResNet-50](../attention.md) times the modules themselves)."]
    summary = summary_line(list(results.values()))
    text += ["", "## In one paragraph", "", summary, "", *REAL_SCALE]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(text))
    return summary


def method(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Method", "",
             "Fashion-MNIST split by class (`examples/transfer_data.py`): the source task holds classes 0-4 "
             "(T-shirt/top, Trouser, Pullover, Dress, Coat), the target task classes 5-9 (Sandal, Shirt, Sneaker, "
             "Bag, Ankle boot). A network is trained on the source task once; then, per target size, seed and "
             "variant, it is fine-tuned on the target task: plain, or with attention inserted first. The seed "
             "sets the data order and the augmentation (and, in classification, the new head's init); the "
             "source model stays fixed. Every variant gets the same hyperparameters; the attention learning rate "
             "(a multiple of the network's) is chosen per variant and size on the validation split with seed 0, "
             "never on the test split.", "",
             f"Statistics: per variant, the paired difference to plain fine-tuning of the same seed, its mean with "
             f"a {LEVEL:.0%} confidence interval from the t distribution (n − 1 degrees of freedom), and the number "
             "of seeds on which it is better. A variant *pays* when the whole interval is above zero, *hurts* "
             "when it is below, and is *noise* when it holds zero.", "",
             "Gate movement, measured on the test images after training (`examples/transfer_stats.py`): for a "
             "gating module, |g − 1| per image and channel through `retrofit.gates` (CBAM: its channel gate; "
             "coordinate attention and EMA: their gates averaged over the map, and at every position), the mean "
             "and the 95th percentile (the larger where a module has several); for an "
             "additive module (global context with add fusion, non-local), ‖Δ(x)‖ / ‖x‖ per image. Both are 0 at "
             "identity insertion. The table gives the mean over sites and seeds and the largest site's 95th "
             f"percentile; below {STILL} the gates are reported as not having moved. For sigmoid gates |g − 1| "
             "is the distance from passing the features through, not a movement from where they started.", ""]
    cls, det = results.get("classification"), results.get("detection")
    if cls:
        s = cls["settings"]
        lines += [f"Classification (`examples/transfer.py`): timm's resnet18 narrowed to 16-32-64-128 channels for "
                  f"28×28 inputs, pretrained {s['source_epochs']} epochs on the source classes (SGD, peak lr "
                  f"{s['source_lr']}); fine-tuned with a new 5-class head on {' or '.join(map(str, s['sizes']))} "
                  f"target images per class for {' and '.join(map(str, s['epochs']))} epochs (SGD with Nesterov "
                  f"momentum, peak lr {s['lr']}, batch {s['batch_size']}, weight decay {s['weight_decay']}, warm-up "
                  f"{s['warmup_epochs']} epoch then cosine, random shifts and flips); validation "
                  f"{s['val_per_class']} images per class held out of the training images; test: the 5,000 test "
                  "images of the target classes.", ""]
    if det:
        s = det["settings"]
        lines += [f"Detection (`examples/yolo_transfer.py`): canvases of {s['canvas']}×{s['canvas']} with 1-4 "
                  "Fashion-MNIST items each (the generator of `examples/yolo.py`), source canvases holding only "
                  f"source-class items, target canvases only target-class items. YOLOv8n trained from scratch on "
                  f"{s['source_train']:,} source canvases for {s['source_epochs']} epochs; then "
                  "`YOLO(source.pt).train(data=target, trainer=retrofit.ultralytics.trainer(...))` on "
                  f"{' or '.join(map(str, s['sizes']))} target canvases (the smaller set is the first canvases of "
                  f"the larger) for {' and '.join(map(str, s['epochs']))} epochs: AdamW lr0 {s['lr0']}, batch "
                  f"{s['batch']}, imgsz {s['imgsz']}, Ultralytics' augmentation and warm-up (one epoch, in which "
                  "every bias, the inserted modules' too, starts at lr 0.1 and the other parameters at 0), CPU; "
                  f"{s['val']} validation and "
                  f"{s['test']:,} test canvases. Both tasks have 5 classes, so Ultralytics copies the source's "
                  "class head too, as it copies every layer whose shape matches. The model each run starts from is "
                  "captured inside the trainer before its first step; its outputs on 8 validation canvases are "
                  "compared with plain fine-tuning's start of the same seed.", "",
                  "The units of (c), (d) and (e) were first run before a fault was fixed on 2026-12-07: "
                  "Ultralytics' fuse(), which every val() runs, set the Conv blocks that hold this attention to "
                  "act(conv(x)), so those runs were evaluated without the attention they were trained with. They "
                  "were discarded and run again with the fix (a block rewritten in place keeps its attention in "
                  "forward_fuse; `tests/test_ultralytics.py::test_fuse_keeps_attention_inside_conv_blocks`). "
                  "CBAM at the Bottleneck adds, (b) and (f), was not affected.", ""]
    return lines


def update_readme(readme: Path, summary: str) -> bool:
    """Replace the block between the markers; False when the README has no markers."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    link = " Details: [transfer experiments](docs/experiments/transfer.md)."
    readme.write_text(f"{head}{README_BEGIN}{summary}{link}{README_END}{tail}")  # one line: the README is kept short
    return True


def main(argv: list[str] | None = None) -> int:
    import transfer
    import yolo_transfer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classification", type=Path, default=ROOT / "docs" / "transfer" / "classification")
    p.add_argument("--detection", type=Path, default=ROOT / "docs" / "transfer" / "detection")
    p.add_argument("--page", type=Path, default=ROOT / "docs" / "experiments" / "transfer.md")
    p.add_argument("--figures", type=Path, default=ROOT / "docs" / "transfer")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md", help="README to update ('-': none)")
    args = p.parse_args(argv)
    results = {}
    for kind, folder, module in (("classification", args.classification, transfer),
                                 ("detection", args.detection, yolo_transfer)):
        if (folder / "settings.json").is_file():
            res = summarise(module.results_from(folder))
            (folder / "results.json").write_text(json.dumps(res, indent=1) + "\n")
            results[kind] = res
    summary = write_page(results, args.page, args.figures)
    if str(args.readme) != "-" and not update_readme(args.readme, summary):
        print(f"transfer_report: {args.readme} has no transfer-summary markers; left as it is", file=sys.stderr)
    print(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
