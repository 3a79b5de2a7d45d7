"""Shared pieces of the fine-tuning, distributed and gate tests: a real timm model small
enough to train for a few steps on 2 CPU cores, and the digits data (examples/example_data.py,
on sys.path through conftest.py, or ddp_worker.py outside pytest)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

import retrofit
from retrofit.data import DataSplits

# timm's resnet18 (BasicBlocks, 2 per stage, 8 residual sites), narrowed to 16..128
# channels with an 8-wide deep stem (the digits demo's network), on 1x32x32 digits: stages
# at 8x8, 4x4, 2x2, 1x1. A fresh timm ResNet zeroes
# the last BatchNorm of every block, so each residual branch (where attention goes)
# outputs zeros; trained models never do, hence zero_init_last=False.
NARROW = {"num_classes": 10, "in_chans": 1, "channels": (16, 32, 64, 128), "stem_type": "deep", "stem_width": 8,
          "zero_init_last": False}


def build(attn: str = "se", gate: str | None = None, seed: int = 0) -> torch.nn.Module:
    """The narrow resnet18, retrofitted; it carries its recipe, so checkpoints rebuild it."""
    torch.manual_seed(seed)
    base = retrofit.create_model("resnet18", **NARROW)
    return retrofit.retrofit(base, attn, gate=gate, input_size=(1, 32, 32), verify=False)


@functools.cache
def _digits() -> DataSplits:
    from example_data import digits_datasets  # here, not above: fsdp_worker.py imports NARROW alone

    return digits_datasets(32, 1)


def tiny_digits(n_train: int = 192, n_val: int = 96) -> tuple[Subset, Subset]:
    """The first ``n_train`` / ``n_val`` images of the digits splits (train is augmented)."""
    d = _digits()
    return Subset(d.train, range(n_train)), Subset(d.val, range(n_val))


def digits_imagefolder(root: Path) -> Path:
    """The digits validation split as a user's data: ``root/CLASS/N.png`` (32x32 grey PNGs),
    what ``retrofit gates --data`` and ``--score-data`` read."""
    from PIL import Image

    val = _digits().val
    for i in range(len(val)):
        x, y = val[i]
        folder = root / str(int(y))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((x[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()  # [-1, 1] back to 0..255
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions on shared cores run far faster on one thread than on two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
