"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2``: FSDP on a retrofitted
model with gloo on the CPU. Not a test module itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from timm.models.resnet import BasicBlock
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

import retrofit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.finetune_helpers import NARROW  # noqa: E402


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = retrofit.create_model("resnet18", **NARROW)
    return {
        "original": base,
        "keep_class": retrofit.retrofit(base, "se", input_size=(1, 32, 32), keep_class=True, verify=False),
        "graph_module": retrofit.retrofit(base, "se", input_size=(1, 32, 32), verify=False),
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result: dict[str, object] = {}
    # FSDP1: the wrap policy finds the blocks by class.
    result["fsdp1_units"] = {
        name: sum(isinstance(m, FullyShardedDataParallel) for m in
                  FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({BasicBlock}),
                                           device_id=torch.device("cpu")).modules())
        for name, model in _models().items()
    }
    # FSDP2: fully_shard each block, then the model; three SGD steps on per-rank data.
    model = _models()["keep_class"]
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(3):
        x, y = torch.randn(4, 1, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = {n: p.full_tensor() for n, p in model.named_parameters()}
    torch.save(params, out / f"params{rank}.pt")
    result.update({"fsdp2_blocks": len(blocks), "losses": losses})
    (out / f"result{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
