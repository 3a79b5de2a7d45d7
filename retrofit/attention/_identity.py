"""The identity check a module must pass before the rewrite inserts it as an identity."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import AttentionError
from ..modes import modes_kept

__all__ = ["identity_error"]


def identity_error(
    module: nn.Module,
    channels: int,
    size: tuple[int, int] = (7, 5),
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> float:
    """Largest ``|module(x) - x|`` over a random input, in train mode and in eval mode.

    The probe is two images of ``channels x size`` (non-square by default, so a module that
    mixes up H and W shows it), standard normal from a fixed seed. Nothing observable
    changes: every submodule's train/eval mode, the module's buffers (BatchNorm running
    statistics, ...) and the global random state are restored, and no gradient is recorded.

    Args:
        module: the attention module, as the rewrite would insert it.
        channels: channels of the probe.
        size: ``(H, W)`` of the probe.
        device: where to put the probe; default: the module's first parameter or buffer,
            else the CPU.
        dtype: dtype of the probe; default: the module's first floating-point parameter or
            buffer, else float32.

    Returns:
        0.0 for an exact identity; ``inf`` when the output has another shape or is not
        finite where the input is.

    Raises:
        AttentionError: the module fails on the probe or returns something not a tensor
            (the message names its class and the probe's shape).

    Example:
        >>> identity_error(create_attention("se", 64), 64)
        0.0
    """
    tensors = [*module.parameters(), *module.buffers()]
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    if dtype is None:
        dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    shape = (2, channels, *size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    worst = 0.0
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), modes_kept(module):
            for train in (True, False):
                module.train(train)
                try:
                    y = module(x.clone())
                except Exception as e:
                    raise AttentionError(
                        f"{type(module).__name__} failed on a {tuple(shape)} {dtype} probe in "
                        f"{'train' if train else 'eval'} mode: {type(e).__name__}: {e}"
                    ) from e
                if not isinstance(y, torch.Tensor):
                    raise AttentionError(
                        f"{type(module).__name__} returned {type(y).__name__}, not a tensor of the input's shape"
                    )
                if y.shape != x.shape:
                    return math.inf
                diff = (y.double() - x.double()).abs().max().item()
                worst = max(worst, diff if math.isfinite(diff) else math.inf)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return worst
