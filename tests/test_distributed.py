"""DistributedDataParallel through torchrun: 2 CPU processes with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from retrofit.distributed import DistContext, ShardSampler, init_distributed
from retrofit.saving import load_training_state

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_end_with_identical_weights(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "tests/ddp_worker.py", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w0 = torch.load(tmp_path / "weights0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "ranks diverged"
    r0 = json.loads((tmp_path / "result0.json").read_text())
    r1 = json.loads((tmp_path / "result1.json").read_text())
    # metrics are reduced over ranks: both report the same numbers
    assert r0["history"] == r1["history"]
    assert [h["world_size"] for h in r0["history"]] == [2, 2]
    assert r0["steps"] == 2 * (128 // 2 // 16)  # each rank sees half the data
    # rank 0 wrote the checkpoint and the log; rank 1, given its own folder, wrote nothing
    assert r0["checkpoint"] and r1["checkpoint"] is None
    assert sorted(p.name for p in (tmp_path / "run0").iterdir()) == ["best.pt", "last.pt", "metrics.jsonl"]
    assert not (tmp_path / "run1").exists()
    ckpt = load_training_state(tmp_path / "run0" / "last.pt")
    assert all(torch.equal(ckpt["model"][k], w0[k]) for k in w0)
    assert len(ckpt["rng"]) == 2  # each rank's RNG, for an exact resume
    assert len((tmp_path / "run0" / "metrics.jsonl").read_text().splitlines()) == 2


def test_one_process_without_torchrun(monkeypatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main, ctx.backend) == (0, 1, False, True, None)
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model) is model
    assert ctx.all_reduce_sums({"a": 2, "b": 0.5}) == {"a": 2.0, "b": 0.5}
    assert ctx.all_gather_object("x") == ["x"]
    ctx.barrier()
    ctx.close()


def test_shard_sampler_covers_every_item_once() -> None:
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert [len(ShardSampler(10, r, 3)) for r in range(3)] == [4, 3, 3]
    assert DistContext(1, 1, 2, torch.device("cpu"), "gloo").is_main is False
