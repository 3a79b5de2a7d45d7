"""Multi-process training with PyTorch's own engine: ``torchrun`` + DistributedDataParallel.

``torchrun --nproc_per_node N script.py`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
:func:`init_distributed` reads them and starts the process group (NCCL on GPUs, gloo on
CPUs). Without them it returns a one-process context, and every helper here is then a
no-op, so the same training code runs alone and under torchrun.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = ["DistContext", "init_distributed", "choose_device", "ShardSampler"]


def choose_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """``device`` if given, else this process's CUDA GPU when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) run."""

    rank: int  # global rank, 0 in a one-process run
    local_rank: int  # rank on this machine (picks the GPU)
    world_size: int  # number of processes
    device: torch.device  # where this process computes
    backend: str | None  # "nccl" or "gloo"; None when not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0: the process that logs, shows progress and writes files."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel when distributed, else ``model``.

        DDP broadcasts rank 0's parameters and buffers at construction and averages
        gradients in backward, so every rank holds the same weights after each step.
        Build a new wrapper whenever the set of trainable parameters changes.
        """
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def all_reduce_sums(self, values: Mapping[str, float]) -> dict[str, float]:
        """Sum each value over all ranks (float64, on the process group's device)."""
        if not self.distributed:
            return {k: float(v) for k, v in values.items()}
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, t.tolist(), strict=True))

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DDP syncs buffers at the start of each forward, so after the last step every rank
        holds statistics updated by its own batch; this makes evaluation and the saved
        model the same on all ranks.
        """
        if self.distributed:
            for buf in model.buffers():
                dist.broadcast(buf.data, src=0)

    def all_gather_object(self, obj: object) -> list[object]:
        """``obj`` from every rank, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroy the process group this context started."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """Start the process group from torchrun's environment, or a one-process context.

    Reads ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` (set by torchrun); the rendezvous address
    comes from ``MASTER_ADDR``/``MASTER_PORT``, also set by torchrun. Uses NCCL when the
    device is a GPU, gloo otherwise.

    Args:
        device: force a device; default :func:`choose_device` (this rank's GPU, else CPU).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = choose_device(device, local_rank)
    if world_size <= 1:
        return DistContext(rank, local_rank, 1, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank, local_rank, world_size, dev, backend)


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``n`` takes items ``r, r + n, r + 2n, ...`` in order, nothing padded.

    For evaluation: unlike ``DistributedSampler`` it repeats no item, so sums reduced over
    ranks count every item exactly once.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))
