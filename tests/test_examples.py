"""The examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_retrofit_timm_example() -> None:
    r = subprocess.run([sys.executable, "examples/retrofit_timm.py", "resnet18", "eca"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "outputs identical to the original: True" in r.stdout
    assert "layer4.1.eca" in r.stdout
