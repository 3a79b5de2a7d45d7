"""A model's state kept while a probe runs: each submodule's train/eval mode, and the plain
attributes a forward may fill.

``model.train(flag)`` sets every submodule to one flag, so restoring with it would turn a
model that kept some layers in eval mode (frozen BatchNorm statistics during fine-tuning,
say) fully back into training mode. These helpers restore each submodule's own flag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["modes_kept", "eval_mode", "train_mode", "plain_attributes_kept"]


@contextlib.contextmanager
def modes_kept(*models: nn.Module) -> Iterator[None]:
    """Restore every submodule's own train/eval flag when the block ends."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode while the block runs; each submodule's own mode afterwards."""
    with modes_kept(*models):
        for model in models:
            model.eval()
        yield


@contextlib.contextmanager
def train_mode(model: nn.Module, training: bool = True) -> Iterator[None]:
    """``model.train(training)`` while the block runs; each submodule's own mode afterwards."""
    with modes_kept(model):
        model.train(training)
        yield


_STATE = ("_parameters", "_buffers", "_modules")


@contextlib.contextmanager
def plain_attributes_kept(*models: nn.Module) -> Iterator[None]:
    """Restore every submodule's plain attributes (and the contents of the dicts, lists and
    sets among them) when the block ends. A forward on fake tensors must not leave fake
    tensors behind in caches a module fills as it runs (LeViT's attention biases, kept in
    a dict per device): the next real forward would compute on them."""
    saved = []
    for model in models:
        for m in model.modules():
            attrs = {k: v for k, v in vars(m).items() if k not in _STATE}
            contents = {k: (v, v.copy()) for k, v in attrs.items() if type(v) in (dict, list, set)}
            saved.append((m, attrs, contents))
    try:
        yield
    finally:
        for m, attrs, contents in saved:
            for k in [k for k in vars(m) if k not in _STATE and k not in attrs]:
                del m.__dict__[k]
            m.__dict__.update(attrs)
            for obj, copy in contents.values():
                obj.clear()
                if isinstance(obj, list):
                    obj.extend(copy)
                else:
                    obj.update(copy)
