"""FSDP on retrofitted models: with keep_class=True the blocks keep their class, so wrap
policies find them and per-block fully_shard trains (2 gloo processes on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp_per_block_on_the_kept_class(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "tests/fsdp_worker.py", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2))
    # FSDP1's ModuleWrapPolicy({BasicBlock}) wraps the 8 blocks (and the root) as on the
    # original; the GraphModule has no BasicBlock left, so only the root is wrapped.
    assert r0["fsdp1_units"] == {"original": 9, "keep_class": 9, "graph_module": 1}
    # FSDP2: fully_shard on each of the 8 blocks, three steps, the same weights on both ranks.
    assert r0["fsdp2_blocks"] == 8 and len(r0["losses"]) == 3 and all(torch.isfinite(torch.tensor(r0["losses"])))
    p0 = torch.load(tmp_path / "params0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "params1.pt", weights_only=True)
    assert p0.keys() == p1.keys() and any(".se." in k for k in p0)
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert r0["losses"] != r1["losses"]  # each rank trained on its own data
