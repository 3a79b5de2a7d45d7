"""Optimizer parameter groups that give the attention retrofit inserted a learning rate of
its own, for any optimizer and any training loop.

The new modules start as exact identities on top of trained weights: they have everything
to learn and the rest of the model little, so they usually want a larger learning rate
(the SE paper trains its modules from scratch with the network; here they join a trained
one, and :func:`retrofit.finetune.fit` gives them 10 times the model's rate by default).
:func:`param_groups` builds the groups from a model; :func:`split_groups` splits groups
that another library built (Ultralytics' trainer, Hugging Face's ``Trainer.create_optimizer``)
so that their own rules (weight decay, their group names) stay as they are.

Example:
    >>> model = retrofit.retrofit(timm.create_model("resnet50"), "se")
    >>> optimizer = torch.optim.AdamW(retrofit.param_groups(model, lr=1e-4, attention_lr_mult=10,
    ...                                                     weight_decay=0.05))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from .errors import OptionError
from .report import report_of

__all__ = ["attention_modules", "attention_parameters", "attention_parameter_names", "param_groups", "split_groups"]


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and
    ``torch.compile`` (``._orig_mod``): the one that carries retrofit's report."""
    while report_of(model) is None:
        inner = getattr(model, "_orig_mod", None)
        inner = getattr(model, "module", None) if inner is None else inner
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def attention_modules(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the modules :func:`retrofit.retrofit` inserted (in the model its
    report is on: inside a ``DistributedDataParallel`` or ``torch.compile`` wrapper); empty
    for a model it did not make."""
    report = report_of(_unwrapped(model))
    return () if report is None else tuple(r.module for r in report.rows)


def attention_parameter_names(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters that
    :func:`retrofit.retrofit` added; empty for a model it did not make."""
    inner = _unwrapped(model)
    prefixes = tuple(f"{m}." for m in attention_modules(inner))
    if not prefixes:
        return set()
    ids = {id(p) for n, p in inner.named_parameters() if n.startswith(prefixes)}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def attention_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters :func:`retrofit.retrofit` added, in ``model.parameters()`` order."""
    names = attention_parameter_names(model)
    return [p for n, p in model.named_parameters() if n in names]


def _check_mult(attention_lr_mult: float) -> float:
    if isinstance(attention_lr_mult, bool) or not isinstance(attention_lr_mult, (int, float)) \
            or not attention_lr_mult > 0:
        raise OptionError(f"attention_lr_mult = {attention_lr_mult!r} is not valid: a positive number (the "
                          "attention's learning rate is the base learning rate times it; 1 gives them the same)")
    return float(attention_lr_mult)


def param_groups(model: nn.Module, lr: float, *, attention_lr_mult: float = 10.0,
                 weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups for ``model``: its own parameters at ``lr``, the attention
    :func:`retrofit.retrofit` added at ``lr * attention_lr_mult``; each split into decayed
    (weights) and undecayed tensors (1-d: biases, norm scales, gate scalars), as timm's
    ``param_groups_weight_decay`` splits them.

    Pass the list to any ``torch.optim`` optimizer; each group carries a ``name``
    (``"base"``, ``"base_no_wd"``, ``"attn"``, ``"attn_no_wd"``) and empty groups are left
    out. A model retrofit did not make has only the two base groups.

    Args:
        model: a model :func:`retrofit.retrofit` or :func:`retrofit.load` returned (also
            wrapped in ``DistributedDataParallel`` or ``torch.compile``).
        lr: the learning rate of the model's own parameters.
        attention_lr_mult: the attention's learning rate as a multiple of ``lr`` (default
            10, :func:`retrofit.finetune.fit`'s default).
        weight_decay: the decay of the decayed groups.

    Returns:
        The groups, for ``torch.optim.SGD(groups, ...)``, ``AdamW(groups)``, ...

    Raises:
        OptionError: ``attention_lr_mult`` is not a positive number.

    Example:
        >>> optimizer = torch.optim.SGD(retrofit.param_groups(model, 0.01, attention_lr_mult=10,
        ...                                                   weight_decay=1e-4), momentum=0.9)
    """
    mult = _check_mult(attention_lr_mult)
    attention = attention_parameter_names(model)
    buckets: dict[str, list[nn.Parameter]] = {"base": [], "base_no_wd": [], "attn": [], "attn_no_wd": []}
    for name, p in model.named_parameters():
        buckets[("attn" if name in attention else "base") + ("_no_wd" if p.ndim <= 1 else "")].append(p)
    return [{"name": key, "params": params, "lr": lr * mult if key.startswith("attn") else lr,
             "weight_decay": 0.0 if key.endswith("_no_wd") else weight_decay}
            for key, params in buckets.items() if params]


def split_groups(groups: Iterable[Mapping[str, Any]], model: nn.Module,
                 attention_lr_mult: float) -> list[dict[str, Any]]:
    """Parameter groups another library built, each split in two: the model's own
    parameters, then (where it holds any) the attention :func:`retrofit.retrofit` added,
    with the same settings and the learning rate times ``attention_lr_mult``.

    For optimizers built elsewhere: ``retrofit.ultralytics.trainer(lr_mult=...)`` splits
    Ultralytics' groups with it; a Hugging Face ``Trainer`` subclass can split those of
    ``create_optimizer`` (see the frameworks guide). A group's other keys (its name, weight
    decay, ``initial_lr``) are kept; the relative order of groups too.

    Raises:
        OptionError: ``attention_lr_mult`` is not a positive number.
    """
    mult = _check_mult(attention_lr_mult)
    attention = {id(p) for p in attention_parameters(model)}
    out: list[dict[str, Any]] = []
    for group in groups:
        params = list(group["params"])
        own = [p for p in params if id(p) not in attention]
        mine = [p for p in params if id(p) in attention]
        out.append({**group, "params": own})
        if mine:
            extra = {"initial_lr": group["initial_lr"] * mult} if "initial_lr" in group else {}
            out.append({**group, "params": mine, "lr": group["lr"] * mult, **extra})
    return out
