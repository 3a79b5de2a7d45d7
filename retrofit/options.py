"""The options of one rewrite, as one record: what :func:`retrofit.retrofit` takes besides the
model and the rules, what a plan is made with, and what a recipe writes down.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import nn

from .attention import GATES
from .errors import OptionError
from .scores import SiteScores

__all__ = ["RetrofitOptions", "LeafSpec", "ON_EXISTING", "leaf_name", "plain_data"]

# A leaf module given by the caller: a class, a class name, or a module path ("layer3.1").
LeafSpec = type[nn.Module] | str
# Where a model already has attention: leave the site ("skip") or add another ("stack").
ON_EXISTING: tuple[str, ...] = ("skip", "stack")


def leaf_name(leaf: LeafSpec) -> str:
    """How a recipe names a leaf module: a class as ``module:QualName``, a string as it is."""
    return leaf if isinstance(leaf, str) else f"{leaf.__module__}:{leaf.__qualname__}"


def plain_data(value: Any) -> Any:
    """JSON-ready: mappings to dicts, tuples to lists."""
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    return value


@dataclass(frozen=True)
class RetrofitOptions:
    """How attention is inserted, beyond which rules choose the sites (see
    :func:`retrofit.retrofit` for each option). Frozen; ``attn_args`` is read-only."""

    gate: str | None = None  # "identity" / "sigmoid" for every rule; None: each rule's own
    attn_args: Mapping[str, Any] = field(default_factory=dict)  # constructor arguments over the rules' args
    input_size: int | tuple[int, ...] | None = None  # (C, H, W), (H, W), (S,) or S; None: the model's default
    leaf_modules: tuple[LeafSpec, ...] = ()  # modules not to trace into
    strict: bool = False  # a rule glob that matches no site is an error
    on_existing: str | None = None  # "skip" / "stack" for every rule; None: each rule's own
    fuse: bool = True  # fuse gating modules into their residual adds
    keep_class: bool = False  # rewrite submodules in place, never the model's own forward
    scores: SiteScores | None = None  # site scores, for rules that select by score

    def __post_init__(self) -> None:
        if self.gate is not None and self.gate not in GATES:
            raise OptionError(f"gate={self.gate!r} is not valid (valid: {', '.join(GATES)})")
        if self.on_existing is not None and self.on_existing not in ON_EXISTING:
            raise OptionError(f"on_existing={self.on_existing!r} is not valid (valid: {', '.join(ON_EXISTING)})")
        object.__setattr__(self, "attn_args", dict(self.attn_args or {}))
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        if self.input_size is not None and not isinstance(self.input_size, int):
            object.__setattr__(self, "input_size", tuple(self.input_size))

    def replace(self, **changes: Any) -> RetrofitOptions:
        """A copy with some options changed."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready), as a recipe records the options; leaf classes as
        ``module:QualName``, scores as their table."""
        d = {f.name: plain_data(getattr(self, f.name)) for f in fields(self)}
        d["leaf_modules"] = [leaf_name(m) for m in self.leaf_modules]
        d["scores"] = None if self.scores is None else self.scores.to_dict()
        if isinstance(self.input_size, int):
            d["input_size"] = self.input_size
        return d

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The options' names, in order."""
        return tuple(f.name for f in fields(cls))
