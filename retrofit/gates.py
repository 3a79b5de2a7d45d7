"""What the gates learned: each inserted module's channel gate on real images, per class.

The SE paper (Hu et al., arXiv:1709.01507, section 7.2) plots the mean excitation of each
channel for images of different classes, block by block: early gates are nearly the same
for every class, late gates tell classes apart. :func:`record_gates` collects those values
from a retrofitted model, :func:`plot_gates` draws them one row per stage (sites grouped
by spatial size), and ``retrofit gates CHECKPOINT`` (also ``python -m retrofit.gates``)
does both from the command line.

Read-only: the model is run in eval mode and left as it was found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .attention import gate_methods
from .errors import AttentionError
from .modes import eval_mode

__all__ = ["SiteGates", "GateRecord", "record_gates", "plot_gates"]


@dataclass(frozen=True)
class SiteGates:
    """The channel gate of one inserted module on every recorded image."""

    module: str  # qualified name of the inserted module ("layer3.1.se")
    path: str  # site path
    attn: str  # attention name
    gate: str  # "identity" (1.0 = unchanged, range (0, 2)) or "sigmoid" (range (0, 1))
    method: str  # the module method the values came from (the first of its class's gates with channels)
    channels: int  # C
    size: tuple[int, int]  # spatial size (H, W) of the module's input on these images
    values: Tensor  # (N, C) gate per image and channel (spatial gates averaged over H, W)

    def mean(self) -> Tensor:
        """(C,) mean gate per channel over all images."""
        return self.values.mean(0)

    def per_class(self, labels: Tensor, num_classes: int | None = None) -> Tensor:
        """(K, C) mean gate per class and channel; NaN for a class with no image."""
        k = int(labels.max()) + 1 if num_classes is None else num_classes
        sums = torch.zeros(k, self.channels, dtype=torch.float64).index_add_(0, labels, self.values.double())
        counts = torch.bincount(labels, minlength=k).double().unsqueeze(1)
        return (sums / counts).float()


@dataclass(frozen=True)
class GateRecord:
    """Gates of every inserted module on one set of images."""

    sites: tuple[SiteGates, ...]  # in graph order
    labels: Tensor | None  # (N,) class index per image, if given
    classes: tuple[str, ...] | None  # class names, in label order
    skipped: tuple[tuple[str, str], ...]  # (module, reason) for inserted modules with no channel gate

    @property
    def num_images(self) -> int:
        return len(self.sites[0].values) if self.sites else 0

    def site(self, module: str) -> SiteGates:
        """The record of one module, by qualified name."""
        for s in self.sites:
            if s.module == module:
                return s
        raise KeyError(f"no gates recorded for {module!r} (recorded: {', '.join(s.module for s in self.sites)})")

    def per_class(self, module: str) -> Tensor:
        """(K, C) mean gate per class for one module.

        Raises:
            ValueError: the record has no labels.
        """
        if self.labels is None:
            raise ValueError("per-class gates need labels; pass labels to record_gates")
        k = len(self.classes) if self.classes else None
        return self.site(module).per_class(self.labels, k)

    def stages(self) -> list[tuple[tuple[int, int], tuple[SiteGates, ...]]]:
        """Sites grouped by spatial size (a stage), largest size first."""
        groups: dict[tuple[int, int], list[SiteGates]] = {}
        for s in self.sites:
            groups.setdefault(s.size, []).append(s)
        return [(size, tuple(g)) for size, g in sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[0][1])]

    def _class_spread(self, s: SiteGates) -> float:
        """Mean over channels of the std over classes of the per-class mean gate."""
        if self.labels is None:
            return float("nan")
        pc = s.per_class(self.labels, len(self.classes) if self.classes else None)
        pc = pc[~pc.isnan().any(1)]
        return float(pc.std(0).mean()) if len(pc) > 1 else float("nan")

    def rows(self) -> list[dict[str, Any]]:
        """A plain-data summary per site (mean, std, min, max, spread across classes)."""
        out = []
        for s in self.sites:
            v = s.values
            out.append({
                "module": s.module, "attn": s.attn, "gate": s.gate, "channels": s.channels,
                "size": list(s.size), "mean": float(v.mean()), "std": float(v.std()),
                "min": float(v.min()), "max": float(v.max()), "class_spread": self._class_spread(s),
            })
        return out

    def summary(self) -> str:
        """One table row per site; `class spread` is how much the gate depends on the class."""
        from tabulate import tabulate

        rows = [[r["module"], r["attn"], r["gate"], r["channels"], "x".join(map(str, r["size"])),
                 r["mean"], r["std"], r["min"], r["max"], r["class_spread"]] for r in self.rows()]
        text = tabulate(rows, headers=["module", "attn", "gate", "C", "size", "mean", "std", "min", "max",
                                       "class spread"], floatfmt=".4f")
        if self.skipped:
            text += "\n\nskipped:\n" + "\n".join(f"  {m}: {why}" for m, why in self.skipped)
        return text

    def to_dict(self, values: bool = False) -> dict[str, Any]:
        """JSON-ready view; with ``values`` the per-class (or mean) gate of every channel."""
        d: dict[str, Any] = {
            "num_images": self.num_images,
            "classes": list(self.classes) if self.classes else None,
            "sites": self.rows(),
            "skipped": [{"module": m, "reason": r} for m, r in self.skipped],
        }
        if values:
            for row, s in zip(d["sites"], self.sites, strict=True):
                row["mean_per_channel"] = s.mean().tolist()
                if self.labels is not None:
                    row["per_class"] = self.per_class(s.module).tolist()
        return d


def _as_channels(g: Tensor, n: int, c: int) -> Tensor | None:
    """(N, C) from a gate of shape (N, C), (N, C, 1, 1) or (N, C, H, W); None otherwise."""
    if g.ndim == 2 and tuple(g.shape) == (n, c):
        return g
    if g.ndim == 4 and g.shape[:2] == (n, c):
        return g.mean((2, 3))
    return None


def _batches(
    data: Tensor | Iterable[Any], labels: Tensor | None, batch_size: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    if isinstance(data, Tensor):
        for i in range(0, len(data), batch_size):
            yield data[i : i + batch_size], None if labels is None else labels[i : i + batch_size]
    else:
        for batch in data:
            if isinstance(batch, (tuple, list)):
                yield batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                yield batch, None


@torch.no_grad()
def record_gates(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    labels: Tensor | None = None,
    *,
    classes: Sequence[str] | None = None,
    batch_size: int = 128,
    limit: int | None = None,
) -> GateRecord:
    """Run ``model`` on images and record the channel gate of every module retrofit inserted.

    Args:
        model: a model returned by :func:`retrofit.retrofit` (or rebuilt from a checkpoint).
        data: an image tensor (N, C, H, W), or an iterable of ``(images, labels)`` batches
            (a DataLoader).
        labels: (N,) class indices when ``data`` is a tensor.
        classes: class names, for the per-class view and the plot legend.
        batch_size: batch size when ``data`` is a tensor.
        limit: stop after this many images.

    Returns:
        A :class:`GateRecord`. The gate of a module is the first method its class names in
        ``fused_gates`` (see :func:`retrofit.attention.gate_methods`) whose value has one
        entry per channel: ``scale()`` for SE, ECA, coordinate attention, GE, SimAM, GC
        with scale fusion alone, timm's names but ``gca`` and ``lcbam``, EMA, shuffle
        attention (unshuffled), triplet attention, BAM, scSE, LSKA, MLCA, SGE and polarized
        self-attention (spatial gates averaged over H and W), ``channel_scale()`` for CBAM,
        light CBAM and GAM. A module without one (non-local, PSA, channel self-attention, GC
        with add fusion, ``gca``, shuffle attention with its shuffle) is listed in ``skipped``
        with why.

    Raises:
        ValueError: ``model`` did not come from :func:`retrofit.retrofit`.

    Example:
        >>> rec = record_gates(gm, images, labels, classes=[str(i) for i in range(10)])
        >>> rec.per_class("layer4.1.se").shape     # (classes, channels)
    """
    from .report import get_report

    rows = get_report(model).rows
    recorder = _Recorder()
    handles = recorder.attach(model, rows)
    try:
        count, seen = _run(model, data, labels, batch_size, limit)
    finally:
        for h in handles:
            h.remove()
    skipped = recorder.skipped
    sites = tuple(
        SiteGates(r.module, r.path, r.attn, r.gate, recorder.methods[r.module], r.channels, recorder.sizes[r.module],
                  torch.cat(recorder.found[r.module]))
        for r in rows if r.module in recorder.found and r.module not in skipped
    )
    all_labels = torch.cat(seen) if seen and sum(map(len, seen)) == count else None
    return GateRecord(
        sites=sites,
        labels=all_labels,
        classes=tuple(classes) if classes is not None else None,
        skipped=tuple((r.module, skipped[r.module]) for r in rows if r.module in skipped),
    )


class _Recorder:
    """Forward pre-hooks on the inserted modules that record each one's channel gate."""

    def __init__(self) -> None:
        self.found: dict[str, list[Tensor]] = {}  # module -> its gate per batch, (N, C) each
        self.sizes: dict[str, tuple[int, int]] = {}  # module -> the (H, W) of its input
        self.methods: dict[str, str] = {}  # module -> the method that gave its channel gate
        self.skipped: dict[str, str] = {}  # module -> why it has no channel gate

    def attach(self, model: nn.Module, rows: Sequence[Any]) -> list[Any]:
        """A hook on each inserted module that declares its gates; the hooks' handles."""
        modules = dict(model.named_modules())
        handles = []
        for row in rows:
            mod = modules.get(row.module)
            chain = gate_methods(mod) if mod is not None else None
            if mod is None or chain is None:
                what = "no module" if mod is None else type(mod).__name__
                self.skipped[row.module] = (f"{what} declares no channel gate (its class's fused_gates names none: "
                                            "its forward is not x * gate(x))")
                continue
            handles.append(mod.register_forward_pre_hook(self._hook(row.module, mod, chain, row.channels)))
        return handles

    def _hook(self, name: str, mod: nn.Module, chain: tuple[str, ...],
              channels: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            # The gates of the chain in forward's order, each applied before the next is
            # computed; the first with one value per channel is the channel gate (CBAM's
            # channel_scale; its spatial gate has one channel).
            y = x
            for method in chain:
                raw = getattr(mod, method)(y)
                g = _as_channels(raw.float(), x.shape[0], channels)
                if g is not None:
                    self.methods.setdefault(name, method)
                    self.found.setdefault(name, []).append(g.cpu())
                    self.sizes[name] = (int(x.shape[-2]), int(x.shape[-1])) if x.ndim == 4 else (1, 1)
                    return
                y = y * raw
            shapes = ", ".join(f"{m}()" for m in chain)
            self.skipped.setdefault(name, f"none of its gates ({shapes}) has one value per channel ({channels})")

        return hook


def _run(model: nn.Module, data: Tensor | Iterable[Any], labels: Tensor | None, batch_size: int,
         limit: int | None) -> tuple[int, list[Tensor]]:
    """Run ``model`` in eval mode on up to ``limit`` images; the count and the labels seen."""
    device = next(model.parameters()).device
    seen: list[Tensor] = []
    count = 0
    with eval_mode(model):
        for x, y in _batches(data, labels, batch_size):
            if limit is not None and count >= limit:
                break
            if limit is not None:
                x = x[: limit - count]
                y = None if y is None else y[: limit - count]
            model(x.to(device))
            count += len(x)
            if y is not None:
                seen.append(torch.as_tensor(y).long().cpu())
    return count, seen


def plot_gates(record: GateRecord, path: str | Path, *, title: str | None = None, max_classes: int = 10) -> Path:
    """Draw every site's gate per channel, one row per stage (sites of one spatial size).

    Each panel shows the mean gate per channel for each class (thin colored lines, the
    first ``max_classes`` classes) and over all images (black); identity gates get a
    dotted line at 1.0, the value that leaves the features unchanged.

    Returns:
        ``path``, a PNG written with matplotlib's Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = record.stages()
    if not stages:
        raise AttentionError(
            "no gates to plot: the record has no sites"
            + (f" (skipped: {', '.join(m for m, _ in record.skipped)}; their attention has no channel gate: "
               "plot models of a gating type, such as se, eca, cbam, coord, ge, simam, ema or gam, or gc with "
               "fuse_scale)" if record.skipped else ""))
    ncols = max(len(sites) for _, sites in stages)
    fig, axes = plt.subplots(len(stages), ncols, figsize=(3.4 * ncols, 2.5 * len(stages)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    names = record.classes or tuple(str(i) for i in range(10_000))
    for r, (size, sites) in enumerate(stages):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(sites):
                ax.axis("off")
                continue
            s = sites[c]
            x = torch.arange(s.channels)
            if record.labels is not None:
                pc = record.per_class(s.module)
                for k in range(min(len(pc), max_classes)):
                    if not pc[k].isnan().any():
                        ax.plot(x, pc[k], lw=0.9, color=cmap(k % 10), label=names[k], zorder=2)
            ax.plot(x, s.mean(), lw=1.0, color="black", ls="--", label="all", zorder=3)
            if s.gate == "identity":
                ax.axhline(1.0, color="gray", lw=0.8, ls=":", zorder=1)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_title(f"{s.module}  ({s.channels} ch, {size[0]}x{size[1]})", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel(f"stage {r + 1}: gate", fontsize=8)
            if r == len(stages) - 1:
                ax.set_xlabel("channel", fontsize=8)
    fig.suptitle(title or f"channel gates per class ({record.num_images} images)", fontsize=9)
    fig.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="class",
                   title_fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
