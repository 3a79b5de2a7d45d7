"""Shared model builders. Real models, ``pretrained=False``, small inputs."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from retrofit.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
# examples/ is a folder of scripts, not a package: `python examples/x.py` finds its siblings
# (example_data, jobs, fashion_setup, ...) because it puts examples/ first on sys.path. Tests
# import the example modules the same way.
sys.path.insert(0, str(ROOT / "examples"))
SCRIPT = shutil.which("retrofit", path=str(Path(sys.executable).parent))  # the installed console script


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread per test process, and in the processes it starts: the cores are
    used by pytest-xdist's workers (``-n auto``), one test file each. The tests' tensors are
    small, and torch's threads spin-wait for each other on every op: on 2 busy cores the same
    tests took 5.7 times the CPU time with 2 threads as with 1."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


class SmallCNN(nn.Module):
    """A plain CNN without BatchNorm whose layers are conv -> max-pool -> ReLU."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pool1(self.conv1(x)))
        x = torch.relu(self.pool2(self.conv2(x)))
        return self.fc(x.flatten(1))


def _like_trained(model: nn.Module) -> nn.Module:
    """Give norm layers the non-trivial statistics and scales of a trained model.

    Fresh timm ResNets zero their last BatchNorm in each block, so every residual branch
    outputs a constant; real checkpoints never do, and a test on such a branch proves
    little.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.1)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    return model


def build(name: str) -> nn.Module:
    """A fresh model with trained-like norms: a timm name, ``tv:NAME`` or ``small_cnn``."""
    torch.manual_seed(0)
    if name == "small_cnn":
        return SmallCNN()
    if name.startswith("tv:"):
        return _like_trained(torchvision.models.get_model(name[3:], weights=None))
    return _like_trained(timm.create_model(name, pretrained=False))


@functools.cache
def cached(name: str) -> nn.Module:
    """A model shared by read-only tests (retrofit never modifies its input)."""
    return build(name)


@pytest.fixture
def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


def run_cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
            process: bool = False) -> subprocess.CompletedProcess[str]:
    """``retrofit ARGS``: ``retrofit.cli.main`` in this process (it returns the code the
    console script exits with), or with ``process`` (or an ``env``) the installed console
    script in a subprocess, which costs ~6 s of imports."""
    if process or env:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run([SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=full_env)
    out, err = io.StringIO(), io.StringIO()
    environ = dict(os.environ)
    try:
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli_main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(environ)  # `-q` quiets huggingface_hub through the environment
    return subprocess.CompletedProcess(["retrofit", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def yolo_save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder save of a five-layer YOLO with SE (tests/hostile_yolo.py); tests edit copies."""
    pytest.importorskip("ultralytics")
    from .hostile_yolo import make_yolo_save

    return make_yolo_save(tmp_path_factory.mktemp("yolo"))
