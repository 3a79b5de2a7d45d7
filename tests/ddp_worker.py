"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: fine-tune on the
digits with gloo, then dump what the test compares. Not a test module itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from retrofit.distributed import init_distributed
from retrofit.finetune import FinetuneConfig, fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # example_data, as conftest.py does
from tests.finetune_helpers import build, tiny_digits  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    assert ctx.world_size == 2 and ctx.backend == "gloo", ctx
    # A different initialisation on each rank: DDP must broadcast rank 0's weights.
    model = build("se", seed=100 + ctx.rank)
    train, val = tiny_digits(128, 48)
    config = FinetuneConfig(epochs=2, batch_size=16, lr=0.05, attn_only_epochs=1, progress=True, seed=0,
                            out=str(out / f"run{ctx.rank}"))
    result = fit(model, train, val, config, ctx=ctx)
    torch.save(model.state_dict(), out / f"weights{ctx.rank}.pt")
    (out / f"result{ctx.rank}.json").write_text(json.dumps({
        "history": [{k: v for k, v in r.items() if k != "time_s"} for r in result.history],
        "steps": result.steps,
        "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
    }))
    ctx.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
