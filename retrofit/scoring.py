"""Scoring candidate sites on the user's data before training (:func:`score_sites`); the
score records and what they mean are :mod:`retrofit.scores`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import retrofit
from .attention import zero_init_params
from .errors import OptionError, SiteError
from .options import RetrofitOptions
from .report import Report, SiteRow, get_report
from .rulefile import RuleSet, resolve_rules
from .scores import SiteScore, SiteScores

__all__ = ["score_sites"]


def _batches(data: Iterable[Any], count: int) -> Iterable[tuple[Tensor, Tensor]]:
    for i, batch in enumerate(data):
        if i >= count:
            return
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise OptionError("score data must yield (images, labels) batches, as a DataLoader over a labelled "
                              f"dataset does; got a {type(batch).__name__}")
        yield batch[0], batch[1]


def _module_flops(module: nn.Module, channels: int, size: tuple[int, int], like: Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, channels, *size), dtype=like.dtype, device=like.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def score_sites(
    model: nn.Module,
    attn: str | None = "se",
    data: Iterable[Any] = (),
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    batches: int = 8,
    rules: str | Path | RuleSet | None = None,
    seed: int = 0,
    options: RetrofitOptions | None = None,
    **overrides: Any,
) -> SiteScores:
    """Score every candidate site of ``model`` for ``attn`` on the user's data.

    A copy of the model gets an identity-gated module at every site the rules would
    consider (their selectors apply; their ``select`` and ``budget`` keys do not); the
    first ``batches`` batches of ``data`` run forward and backward through it in eval
    mode (BatchNorm statistics stay as they are), one batch at a time, and the gradient
    of the mean loss with respect to each module's zero-initialised parameters is its
    site's score (see the module docstring). No weight is changed and ``model`` is not
    touched; for a fixed data order (and ``seed``) the scores are the same on every run.

    Args:
        model: the trained model.
        attn: built-in rule set or attention type, as for :func:`retrofit.retrofit`.
        data: an iterable of ``(images, labels)`` batches (a DataLoader).
        loss_fn: ``loss_fn(model(images), labels)``, a scalar; default cross-entropy.
        batches: how many batches to average the gradient over.
        rules: a rule file or RuleSet instead of ``attn``.
        seed: seeds the candidate modules' random layers (SE's first layer, ...), which
            the gradient at the zero layer depends on; the caller's random state is kept.
        options: the rewrite's options, as for :func:`retrofit.retrofit` (the gate is
            always ``"identity"``; the input size defaults to the first batch's, and sets
            the site sizes in the result).
        overrides: options by name, over ``options`` (``attn_args``, ``leaf_modules``, ...).

    Returns:
        :class:`SiteScores`, one row per candidate site in graph order.

    Raises:
        OptionError: no batch, batches that are not ``(images, labels)``, or an option that
            is unknown or not valid.
        SiteError: no candidate site.

    Example:
        >>> scores = retrofit.score_sites(model, "se", loader, batches=8)
        >>> print(scores.table())
    """
    options = RetrofitOptions.of(options, **overrides)
    if batches < 1:
        raise OptionError(f"batches must be at least 1, not {batches}")
    stream = iter(_batches(data, batches))
    first = next(stream, None)
    if first is None:
        raise OptionError("score_sites needs at least one (images, labels) batch of data; the data is empty")
    size = tuple(first[0].shape[1:]) if options.input_size is None else options.input_size
    ruleset = resolve_rules(attn, rules).unlimited()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gm = retrofit(model, rules=ruleset, options=options.replace(gate="identity", input_size=size), verify=True)
    report = get_report(gm)
    if not report.rows:
        raise SiteError(f"the rules {ruleset.name!r} select no site of {type(model).__name__}; nothing to score")
    zero = _zero_params(gm, report)
    count, images, x = _accumulate(gm, loss_fn, [first, *stream])
    rows = [_score(gm, r, zero[r.module], count, x) for r in report.rows]
    if all(r.score == 0 for r in rows):
        warnings.warn(
            f"every site of {type(model).__name__} scores 0: no gradient reaches the inserted modules, so the "
            "scores cannot rank them (untrained residual branches that output zeros, as a fresh timm ResNet's "
            "zero-initialised last norm makes them, do this); score a trained model", stacklevel=2)
    return SiteScores(tuple(rows), ruleset.name, count, images, report.params_before, report.flops_before)


def _zero_params(gm: nn.Module, report: Report) -> dict[str, list[nn.Parameter]]:
    """Each inserted module's zero-initialised parameters, the only ones that take a
    gradient from here on.

    Raises:
        SiteError: the attention type has none (it does not start at identity that way).
    """
    zero = {r.module: zero_init_params(gm.get_submodule(r.module)) for r in report.rows}
    if not any(zero.values()):
        raise SiteError(f"attention {report.rows[0].attn!r} has no zero-initialised parameters (its class does not "
                        "start at identity through zero_init_), so its sites cannot be scored")
    for p in gm.parameters():
        p.requires_grad_(False)
    for params in zero.values():
        for p in params:
            p.requires_grad_(True)
            p.grad = None
    return zero


def _accumulate(gm: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[int, int, Tensor]:
    """Forward and backward over the batches in eval mode, the gradients adding up; the
    number of batches and images, and the last input (for the modules' FLOPs)."""
    device = next(gm.parameters()).device
    gm.eval()
    count = images = 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        loss_fn(gm(x), y).backward()  # gradients add up over batches; divided by their count below
        count += 1
        images += len(x)
    return count, images, x


def _score(gm: nn.Module, r: SiteRow, zero: list[nn.Parameter], count: int, x: Tensor) -> SiteScore:
    """One site's score: the norm of the mean gradient at its zero parameters, per parameter."""
    grads = [p.grad.flatten() for p in zero if p.grad is not None]
    numel = sum(p.numel() for p in zero)
    # A module with no zero-initialised parameter (a user type) has no score: NaN ranks last.
    norm = float(torch.linalg.vector_norm(torch.cat(grads).double() / count)) if grads else math.nan
    return SiteScore(
        path=r.path, qualname=r.qualname, kind=r.kind, position=r.position, attn=r.attn, channels=r.channels,
        size=r.size, stage=r.stage, module=r.module, score=norm / math.sqrt(numel) if numel else math.nan,
        grad_norm=norm, params=r.params, flops=_module_flops(gm.get_submodule(r.module), r.channels, r.size, x),
    )
