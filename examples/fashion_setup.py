"""What the two Fashion-MNIST experiments share: the settings that decide the numbers, the
residual CNN and its pretraining (the base every contender starts from), training and
evaluation on the tensor data sets of ``example_data``, and how the reports write numbers.

``examples/fashion_mnist.py`` runs the lab and the retrofit experiment on these;
``examples/placement.py`` reuses the pretrained base and the fine-tuning budget.
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.data import Dataset, Subset

from retrofit.finetune import FinetuneConfig, fit

INPUT = (1, 28, 28)
IDENTITY_ATTNS = ("se", "eca", "cbam", "coord", "ge", "gc", "simam")
SIGMOID_ATTNS = ("se", "eca", "cbam")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers; written into results.json."""

    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 128
    weight_decay: float = 5e-4
    lab_epochs: int = 15
    lab_lr: float = 0.05
    base_epochs: int = 10
    base_lr: float = 0.1
    epochs: int = 3  # the extra budget every contender gets (full data)
    lr: float = 0.01  # fine-tuning peak lr of the network's own parameters
    attn_lr_mults: tuple[float, ...] = (10.0, 1.0)  # attention lr = mult * lr; chosen on validation
    attn_only: tuple[int, ...] = (0, 1)  # attention-only warm-up epochs; chosen on validation
    low_fraction: float = 0.1  # training images in the low-data run
    low_epochs: int = 10
    val_size: int = 6000
    train_limit: int | None = None  # use only this many training images (smoke runs)
    attns: tuple[str, ...] = IDENTITY_ATTNS
    sigmoid_attns: tuple[str, ...] = SIGMOID_ATTNS
    threads: int = 2

    def grid(self) -> list[tuple[float, int]]:
        return list(itertools.product(self.attn_lr_mults, self.attn_only))


FULL = Settings()
QUICK = Settings(seeds=(0,), lab_epochs=2, base_epochs=2, epochs=1, low_epochs=1, train_limit=6000, val_size=1000,
                 attn_lr_mults=(10.0,), attns=("se", "cbam"), sigmoid_attns=("se",))


# --------------------------------------------------------------------------- the residual CNN


def residual_cnn() -> nn.Module:
    """timm's resnet18 narrowed to 16-32-64-128 channels for 1x28x28 inputs: the 7x7
    stride-2 stem conv becomes a 3x3 stride-2 conv and the stem max-pool is dropped, so the
    four stages see 14x14, 7x7, 4x4 and 2x2 maps (the usual change for small images)."""
    model = timm.create_model("resnet18", num_classes=10, in_chans=1, channels=(16, 32, 64, 128))
    model.conv1 = nn.Conv2d(1, model.bn1.num_features, 3, stride=2, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def base_unit(seed: int, s: Settings, data: Any, weights: Path) -> dict[str, Any]:
    """Pretrain the residual CNN of ``seed`` (``s.base_epochs`` on ``data.train``), save it
    to ``weights``; the unit's record (its accuracies and curve)."""
    torch.manual_seed(seed)
    model = residual_cnn()
    hist = train(model, data.train, data.val, config(s, seed, epochs=s.base_epochs, lr=s.base_lr, warmup_epochs=1.0))
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(weights))
    test_x, test_y = stack(data.test)
    return {"seed": seed, "params": sum(p.numel() for p in model.parameters()),
            "test_acc": accuracy(logits_of(model, test_x), test_y), "val_acc": hist[-1]["val_acc"],
            "curve": [h["val_acc"] for h in hist], "epoch_s": [round(h["time_s"], 2) for h in hist]}


def load_base(weights: Path) -> nn.Module:
    """The residual CNN with the weights :func:`base_unit` saved."""
    model = residual_cnn()
    load_model(model, str(weights))
    return model


# --------------------------------------------------------------------------- training


def stack(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of an (unaugmented) TensorDataset or Subset of one."""
    if isinstance(dataset, Subset):
        x, y = stack(dataset.dataset)
        idx = torch.as_tensor(dataset.indices)
        return x[idx], y[idx]
    return dataset.tensors  # type: ignore[attr-defined]


@torch.no_grad()
def logits_of(model: nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])
    model.train(was)
    return out


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).double().mean().item()


def config(s: Settings, seed: int, **kw: Any) -> FinetuneConfig:
    return FinetuneConfig(batch_size=s.batch_size, weight_decay=s.weight_decay, seed=seed, progress=False, **kw)


def train(model: nn.Module, train_set: Dataset, val_set: Dataset, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    return list(fit(model, train_set, val_set, cfg).history)


def limited(data: Any, limit: int | None) -> Any:
    """The splits with the training split cut to its first ``limit`` images (smoke runs)."""
    if limit is None or limit >= len(data.train):
        return data
    return replace(data, train=Subset(data.train, range(limit)))


# --------------------------------------------------------------------------- numbers in the reports


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values: list[float]) -> str:
    if not values:
        return "–"
    m, sd = mean_std(values)
    return f"{100 * m:.2f} ± {100 * sd:.2f}" if len(values) > 1 else f"{100 * m:.2f}"


def delta(a: list[float], b: list[float]) -> str:
    n = min(len(a), len(b))
    if not n:
        return "–"
    m, sd = mean_std([x - y for x, y in zip(a[:n], b[:n], strict=True)])
    return f"{100 * m:+.2f} ± {100 * sd:.2f}" if n > 1 else f"{100 * m:+.2f}"

