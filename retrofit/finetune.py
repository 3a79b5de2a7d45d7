"""Fine-tune a retrofitted model: the new attention parameters get their own learning rate
(and, optionally, the first epochs to themselves), the schedule is a linear warm-up then
a cosine, and checkpoints resume exactly.

One function, :func:`fit`, runs alone or under ``torchrun`` (see :mod:`retrofit.distributed`):
CUDA when present, bf16 autocast on GPU, channels-last and ``torch.compile`` on request, a
progress bar and a JSON-lines metrics log on rank 0, checkpoints written by rank 0 only.

Checkpoints carry the model's recipe (:mod:`retrofit.recipe`), so :func:`retrofit.load`
builds a fine-tuned model again from ``best.pt`` alone.

Example:
    >>> gm = retrofit.retrofit(retrofit.create_model("resnet50", pretrained=True), "se")
    >>> data = imagefolder_datasets("data/", gm)
    >>> fit(gm, data.train, data.val, FinetuneConfig(epochs=10, out="runs/se"))
    >>> gm = retrofit.load("runs/se/best.pt")
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpoint import TrainingCheckpoint
from .distributed import DistContext, ShardSampler, init_distributed
from .errors import OptionError
from .modes import eval_mode
from .optim import attention_modules, attention_parameter_names, param_groups
from .recipe import get_recipe
from .saving import buffer_names, load_training_state, package_versions, save_training_state, write_model_files

__all__ = [
    "FinetuneConfig",
    "FitResult",
    "WarmupCosine",
    "evaluate",
    "fit",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. Learning rates are the peaks of the warm-up + cosine schedule."""

    epochs: int = 10  # total epochs, attention-only ones included
    batch_size: int = 64  # per process
    lr: float = 0.01  # peak learning rate of the model's own parameters
    attn_lr: float | None = None  # peak learning rate of the new attention parameters; None: 10 * lr
    attn_only_epochs: int = 0  # the first epochs train only the attention parameters (norm statistics frozen too)
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adamw"
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # not applied to 1-d tensors (biases, norm scales)
    warmup_epochs: float = 1.0  # linear warm-up length in epochs (fractions allowed)
    min_lr_ratio: float = 0.0  # the cosine ends at this fraction of the peak
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    clip_grad_norm: float | None = None  # clip the gradient norm to this; None: no clipping
    amp: bool | None = None  # bf16 autocast; None: on CUDA only
    channels_last: bool = False  # channels-last memory format for the model and inputs
    compile: bool = False  # torch.compile the training model
    num_workers: int = 0  # DataLoader worker processes
    seed: int = 0  # seeds the shuffle (same on all ranks) and the augmentation (offset by rank)
    device: str | None = None  # None: this rank's CUDA GPU if any, else the CPU
    progress: bool = True  # tqdm progress bar and a line per epoch (rank 0 only)
    out: str | None = None  # folder for last.pt, best.pt and metrics.jsonl (written by rank 0)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise OptionError(f"unknown optimizer {self.optimizer!r} (valid: {', '.join(OPTIMIZERS)})")
        if not self.lr > 0 or (self.attn_lr is not None and not self.attn_lr > 0):
            raise OptionError(f"lr and attn_lr must be positive (got {self.lr}, {self.attn_lr}); to train only the "
                              "attention, set attn_only_epochs=epochs")
        if self.epochs < 1 or self.batch_size < 1:
            raise OptionError(f"epochs and batch_size must be positive (got {self.epochs}, {self.batch_size})")
        if not 0 <= self.attn_only_epochs <= self.epochs:
            raise OptionError(f"attn_only_epochs must be in 0..epochs={self.epochs}, not {self.attn_only_epochs}")
        if self.warmup_epochs < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise OptionError("warmup_epochs must be >= 0 and min_lr_ratio in [0, 1]")

    @property
    def peak_attn_lr(self) -> float:
        return 10.0 * self.lr if self.attn_lr is None else self.attn_lr


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` did."""

    history: tuple[dict[str, Any], ...]  # one metrics record per epoch, resumed epochs included
    best_val_acc: float  # best validation accuracy seen (fraction)
    best_epoch: int  # 1-based epoch of the best validation accuracy
    checkpoint: Path | None  # last.pt; None without `out`, and on ranks other than 0
    steps: int  # optimizer steps taken in total


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from: Python, NumPy, torch CPU and CUDA."""
    state: Any = np.random.get_state()  # legacy tuple form (typed loosely)
    kind, keys, pos, has_gauss, gauss = state
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class WarmupCosine:
    """Learning-rate factor per step: linear from ``1 / warmup`` to 1 over ``warmup`` steps,
    then a half cosine from 1 down to ``min_ratio`` at ``total`` steps."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0) -> None:
        self.warmup, self.total, self.min_ratio = warmup, max(total, 1), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_optimizer(groups: list[dict[str, Any]], config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups)
    return torch.optim.SGD(groups, momentum=config.momentum, nesterov=config.momentum > 0)


def _to_input(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    ctx: DistContext | None = None,
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy over ``loader``, summed over all ranks.

    Give each rank a disjoint shard (:class:`~retrofit.distributed.ShardSampler`) and the
    unwrapped model (DDP's forward would ask every rank for the same number of batches).

    Returns:
        ``{"loss": ..., "acc": ..., "count": ...}``.
    """
    device = next(model.parameters()).device
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    with eval_mode(model):
        for x, y in loader:
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(_to_input(x, device, channels_last))
            sums["loss"] += F.cross_entropy(logits.float(), y, reduction="sum").item()
            sums["correct"] += (logits.argmax(1) == y).sum().item()
            sums["count"] += len(y)
    if ctx is not None:
        sums = ctx.all_reduce_sums(sums)
    n = max(sums["count"], 1.0)
    return {"loss": sums["loss"] / n, "acc": sums["correct"] / n, "count": sums["count"]}


def _resolve_amp(config: FinetuneConfig, device: torch.device) -> bool:
    if config.amp is False:
        return False
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn(f"{torch.cuda.get_device_name(device)} has no bf16; training in float32", stacklevel=3)
        return False
    return config.amp is True or device.type == "cuda"


def _set_phase(model: nn.Module, attn: set[str], attn_only: bool) -> None:
    """Attention-only phase: only the attention parameters take gradients."""
    for name, p in model.named_parameters():
        p.requires_grad_(name in attn or not attn_only)


def _freeze_norm_stats(model: nn.Module) -> None:
    """Eval mode for the model's own norm layers, so their running statistics stay put."""
    prefixes = tuple(f"{m}." for m in attention_modules(model))
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and not (prefixes and f"{name}.".startswith(prefixes)):
            m.eval()


class _JsonLines:
    """Append one JSON object per line (rank 0 only; a no-op elsewhere)."""

    def __init__(self, path: Path | None, fresh: bool) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                path.write_text("")

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    resume: str | Path | None = None,
    ctx: DistContext | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Fine-tune ``model`` (a retrofitted GraphModule, or any classifier) in place.

    The attention parameters :func:`retrofit.retrofit` added get ``config.attn_lr``; for
    the first ``config.attn_only_epochs`` epochs nothing else trains (the model's own
    parameters are frozen and its BatchNorm layers keep their statistics). Each step is one
    optimizer step of a per-step warm-up + cosine schedule.

    Checkpoints (``config.out``) carry the model's recipe (what :func:`retrofit.retrofit`
    attached), so that :func:`retrofit.load` and ``retrofit gates`` build it again.

    Under ``torchrun`` (or with a distributed ``ctx``) the model is wrapped in
    DistributedDataParallel, the training set is split by ``DistributedSampler``, metrics
    are summed over ranks, BatchNorm statistics are copied from rank 0 after each epoch,
    and only rank 0 logs and writes files. Every rank ends with the same weights and
    history. The caller owns the process group (``ctx.close()`` at the end).

    Args:
        model: the model to train; its parameters are updated in place (moved to the
            device, and to channels-last if asked).
        train_set: yields ``(image, class index)``.
        val_set: evaluated after every epoch.
        config: the recipe.
        resume: a ``last.pt`` from an earlier run of the same recipe; training continues
            after its last epoch with the model, optimizer, schedule and RNG states it had.
        ctx: the process context; default :func:`~retrofit.distributed.init_distributed`.
        on_epoch: called with each epoch's metrics record (on every rank).

    Returns:
        A :class:`FitResult` with the per-epoch history.

    Raises:
        OptionError: ``attn_only_epochs`` is set but the model has no attention parameters.
        ModelLoadError: ``resume`` is not a readable retrofit checkpoint.
        SaveError: the recipe names a model file that no longer exists (checkpoints record
            its hash).
    """
    ctx = ctx or init_distributed(config.device)
    run = _prepare(model, train_set, val_set, config, ctx)
    start = _Start(0, 0, [], (-1.0, 0), None)
    if resume is not None:
        start = _restore(resume, run, max(run.steps_per_epoch, len(cast(Sized, train_set))))
    out, recipe_data = _output_folder(model, config, ctx)
    log = _JsonLines(out / "metrics.jsonl" if out else None, fresh=resume is None)
    if start.rng is not None:
        set_rng_state(start.rng)
    step, history, best = start.step, start.history, start.best
    phase: bool | None = None  # attention-only?
    net: Any = model  # the module, its DDP/FSDP wrapper, or a compiled callable
    last_path = None
    for epoch in range(start.epoch, config.epochs):
        attn_only = epoch < config.attn_only_epochs
        if attn_only != phase:
            phase, net = attn_only, _enter_phase(run, attn_only)
        step, record = _run_epoch(run, net, epoch, step)
        history.append(record)
        if record["val_acc"] > best[0]:
            best = (record["val_acc"], epoch + 1)
        rngs = ctx.all_gather_object(rng_state())
        if out is not None:
            log.write(record)
            last_path = _save_epoch(run, out, recipe_data, step, rngs, history, best)
        if run.show:
            _print_epoch(record, config.epochs)
        if on_epoch is not None:
            on_epoch(record)
    _set_phase(model, run.attn, attn_only=False)
    ctx.barrier()
    return FitResult(tuple(history), best[0], best[1], last_path, step)


@dataclass(frozen=True)
class _Run:
    """What every epoch of one :func:`fit` run uses."""

    model: nn.Module  # the model trained (unwrapped)
    config: FinetuneConfig
    ctx: DistContext
    attn: set[str]  # names of the attention parameters
    amp: bool  # bf16 autocast
    show: bool  # progress bar and epoch lines (rank 0 with config.progress)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    schedule_args: tuple[int, int]  # (warm-up steps, total steps) of the schedule
    train_sampler: DistributedSampler
    loader_gen: torch.Generator  # reseeded each epoch: the shuffle of the augmentation workers
    train_loader: DataLoader
    val_loader: DataLoader

    @property
    def steps_per_epoch(self) -> int:
        return max(len(self.train_loader), 1)


def _prepare(model: nn.Module, train_set: Dataset, val_set: Dataset, config: FinetuneConfig,
             ctx: DistContext) -> _Run:
    """The model on its device, the loaders, the optimizer and the schedule of a run.

    Raises:
        OptionError: ``attn_only_epochs`` is set but the model has no attention parameters.
    """
    attn = attention_parameter_names(model)
    if config.attn_only_epochs and not attn:
        raise OptionError(
            f"attn_only_epochs={config.attn_only_epochs} but {type(model).__name__} has no attention "
            "parameters (it did not come from retrofit()); use attn_only_epochs=0"
        )
    amp = _resolve_amp(config, ctx.device)
    model.to(ctx.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    torch.manual_seed(config.seed + ctx.rank)
    train_sampler, loader_gen, train_loader, val_loader = _loaders(train_set, val_set, config, ctx)
    steps_per_epoch = max(len(train_loader), 1)
    groups = param_groups(model, config.lr, attention_lr_mult=config.peak_attn_lr / config.lr,
                          weight_decay=config.weight_decay)
    optimizer = _make_optimizer(groups, config)
    schedule_args = (round(config.warmup_epochs * steps_per_epoch), config.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(*schedule_args, config.min_lr_ratio))
    return _Run(model=model, config=config, ctx=ctx, attn=attn, amp=amp, show=ctx.is_main and config.progress,
                optimizer=optimizer, scheduler=scheduler, schedule_args=schedule_args, train_sampler=train_sampler,
                loader_gen=loader_gen, train_loader=train_loader, val_loader=val_loader)


def _output_folder(model: nn.Module, config: FinetuneConfig, ctx: DistContext) -> tuple[Path | None, Any]:
    """Where rank 0 writes (None elsewhere, or without ``config.out``) and the recipe the
    checkpoints record, as it names the model file it carries into that folder."""
    out = Path(config.out) if config.out is not None and ctx.is_main else None
    recipe = get_recipe(model)
    if recipe is None or out is None:
        return out, None
    located, carried = recipe.located(out)
    if carried:  # beside the checkpoints, which name it (a run's folder is its own: replaced)
        out.mkdir(parents=True, exist_ok=True)
        write_model_files(out, carried, force=True)
    return out, located.to_dict()


def _enter_phase(run: _Run, attn_only: bool) -> Any:
    """Switch what trains (the attention alone, or everything) and wrap the model again for
    it (DDP keeps the set of parameters it was built with); the callable to train with."""
    _set_phase(run.model, run.attn, attn_only)
    net = run.ctx.wrap(run.model)
    return torch.compile(net) if run.config.compile else net


def _run_epoch(run: _Run, net: Any, epoch: int, step: int) -> tuple[int, dict[str, Any]]:
    """Train one epoch and validate; the step count after it and the epoch's record."""
    config, ctx = run.config, run.ctx
    attn_only = epoch < config.attn_only_epochs
    run.train_sampler.set_epoch(epoch)
    run.loader_gen.manual_seed(config.seed * 1_000_003 + epoch * 1009 + ctx.rank)
    run.model.train()
    if attn_only:
        _freeze_norm_stats(run.model)
    t0 = time.perf_counter()
    step, sums = _train_epoch(run, net, step, f"epoch {epoch + 1}/{config.epochs}")
    sums = ctx.all_reduce_sums(sums)
    ctx.broadcast_buffers(run.model)
    val = evaluate(run.model, run.val_loader, ctx, amp=run.amp, channels_last=config.channels_last)
    return step, _record(epoch, step, attn_only, sums, val, run.optimizer, time.perf_counter() - t0, ctx)


def _save_epoch(run: _Run, out: Path, recipe_data: Any, step: int, rngs: list[Any],
                history: list[dict[str, Any]], best: tuple[float, int]) -> Path:
    """Write ``last.pt`` after an epoch, and ``best.pt`` (weights only) when it is the best."""
    epoch = len(history)
    ckpt = TrainingCheckpoint(
        recipe=recipe_data, versions=package_versions(), buffers=tuple(buffer_names(run.model)),
        model=run.model.state_dict(), optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
        epoch=epoch, step=step, rng=tuple(cast(list[dict[str, Any]], rngs)), config=asdict(run.config),
        history=tuple(history), best_val_acc=best[0], best_epoch=best[1])
    last_path = save_training_state(out / "last.pt", ckpt.to_dict())
    if best[1] == epoch:
        save_training_state(out / "best.pt", {**ckpt.to_dict(), "optimizer": None, "scheduler": None})
    return last_path


def _print_epoch(record: Mapping[str, Any], epochs: int) -> None:
    from tqdm.auto import tqdm

    tqdm.write(
        f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} "
        f"acc {record['train_acc']:.4f}  val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}  "
        f"({record['time_s']:.1f}s)"
    )


def _loaders(train_set: Dataset, val_set: Dataset, config: FinetuneConfig,
             ctx: DistContext) -> tuple[DistributedSampler, torch.Generator, DataLoader, DataLoader]:
    """The training loader (a distributed sampler over the ranks, shuffled by a generator
    reseeded per epoch) and the validation loader (a disjoint shard per rank)."""
    pin = ctx.device.type == "cuda"
    train_sampler: DistributedSampler[Any] = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                       shuffle=True, seed=config.seed)
    loader_gen = torch.Generator()
    train_loader = DataLoader(
        train_set, batch_size=config.batch_size, sampler=train_sampler, num_workers=config.num_workers,
        pin_memory=pin, drop_last=len(train_sampler) >= config.batch_size, generator=loader_gen,
    )
    shard = ShardSampler(len(cast(Sized, val_set)), ctx.rank, ctx.world_size)
    val_loader = DataLoader(
        val_set, batch_size=config.batch_size, sampler=shard, num_workers=config.num_workers, pin_memory=pin,
    )
    return train_sampler, loader_gen, train_loader, val_loader


@dataclass(frozen=True)
class _Start:
    """Where training starts: from scratch, or where a resumed run stopped."""

    epoch: int  # epochs already done
    step: int  # optimizer steps already done
    history: list[dict[str, Any]]  # the records of the epochs done
    best: tuple[float, int]  # (best validation accuracy, its epoch)
    rng: Any  # this rank's random states to restore, or None


def _restore(resume: str | Path, run: _Run, max_steps_per_epoch: int) -> _Start:
    """Load a ``last.pt`` into the model, optimizer and scheduler; where to go on from. The
    checkpoint is checked whole (:class:`~retrofit.checkpoint.TrainingCheckpoint`) before
    anything is loaded: a bad one leaves the model and optimizer as they were."""
    model, optimizer, scheduler, config, ctx = run.model, run.optimizer, run.scheduler, run.config, run.ctx
    where = f"training checkpoint {str(resume)!r}"
    ckpt = TrainingCheckpoint.from_dict(load_training_state(resume), where)
    ckpt.check_resume(model, optimizer, scheduler, epochs=config.epochs, max_steps_per_epoch=max_steps_per_epoch,
                      where=where)
    ckpt.restore(model, optimizer, scheduler, where)
    # The schedule is this config's (the same for the same recipe; a larger `epochs`
    # stretches the cosine from where the run stopped).
    schedule = WarmupCosine(run.schedule_args[0], run.schedule_args[1], config.min_lr_ratio)
    scheduler.lr_lambdas = [schedule] * len(optimizer.param_groups)
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * schedule(scheduler.last_epoch)
    rngs = ckpt.rng
    return _Start(ckpt.epoch, ckpt.step, [dict(h) for h in ckpt.history], (ckpt.best_val_acc, ckpt.best_epoch),
                  rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])


def _train_epoch(run: _Run, net: Any, step: int, desc: str) -> tuple[int, dict[str, float]]:
    """One pass over the training loader, a step per batch; the step count after it and
    this rank's sums of loss, correct predictions and samples."""
    from tqdm.auto import tqdm

    config, device, optimizer, scheduler = run.config, run.ctx.device, run.optimizer, run.scheduler
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    bar = tqdm(run.train_loader, desc=desc, disable=not run.show, leave=False, dynamic_ncols=True)
    for x, y in bar:
        x, y = _to_input(x, device, config.channels_last), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.amp):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], config.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if run.show and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return step, {"loss": loss_sum.item(), "correct": correct.item(), "count": seen}


def _record(epoch: int, step: int, attn_only: bool, sums: Mapping[str, float], val: Mapping[str, float],
            optimizer: torch.optim.Optimizer, seconds: float, ctx: DistContext) -> dict[str, Any]:
    """The metrics record of one epoch (what metrics.jsonl holds, one per line)."""
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    return {
        "epoch": epoch + 1,
        "step": step,
        "phase": "attn-only" if attn_only else "all",
        "train_loss": sums["loss"] / max(sums["count"], 1.0),
        "train_acc": sums["correct"] / max(sums["count"], 1.0),
        "val_loss": val["loss"],
        "val_acc": val["acc"],
        "lr": lrs.get("base", lrs.get("base_no_wd")),
        "attn_lr": lrs.get("attn", lrs.get("attn_no_wd")),
        "time_s": seconds,
        "world_size": ctx.world_size,
    }
