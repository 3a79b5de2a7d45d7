"""The digits demo runs end to end (tiny settings) and writes its table and plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.examples
def test_digits_demo_writes_table_and_plots(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "examples/digits_demo.py", "--seeds", "0", "--base-epochs", "1", "--epochs", "1",
         "--attn", "eca", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    for row in ("| baseline (1 epochs) |", "| baseline, continued |", "| eca, identity gates |",
                "| eca, sigmoid gates |"):
        assert row in table
    results = json.loads((tmp_path / "results.json").read_text())
    identity = results["contenders"]["eca, identity gates"]
    # the script asserts exact logits; the accuracy right after insertion is the baseline's
    assert identity["at_insertion"] == results["baseline"]["acc"]
    assert len(identity["curve"][0]) == 2  # insertion point + 1 epoch
    for png in ("curves.png", "gates_eca.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
