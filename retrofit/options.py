"""The options of one rewrite, as one record: what :func:`retrofit.retrofit` takes besides the
model and the rules, what a plan is made with, and what a recipe writes down.

:class:`RetrofitOptions` is the one declaration of every option: its name, default, type
in a file (a recipe's JSON) and check. :func:`retrofit.retrofit`, :func:`retrofit.plan`,
:func:`retrofit.score_sites`, the command line and the Ultralytics trainer take the record
(``options=``) and keyword overrides of its fields; recipes write it with :meth:`to_dict`
and read it with :meth:`from_dict`; a resumed run compares it with ``==``. Adding an option
is one field here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from torch import nn

from .attention import GATES
from .errors import ModelLoadError, OptionError
from .readfile import current_limits
from .scores import SiteScores
from .text import excerpt

__all__ = ["RetrofitOptions", "LeafSpec", "ON_EXISTING", "plain_data"]

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


# ----------------------------------------------------------------------------- checks
# A check takes the value a caller gave and returns it normalised, or raises OptionError;
# a reader takes the value a file holds (its JSON type already checked) and returns the
# option's value, or raises ModelLoadError with `where`.

def _one_of(name: str, valid: tuple[str, ...]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is not None and value not in valid:
            raise OptionError(f"{name}={value!r} is not valid (valid: {', '.join(valid)})")
        return value
    return check


def _table(value: Any) -> dict[str, Any]:
    return dict(value or {})


def _size(value: Any) -> int | tuple[int, ...] | None:
    return value if value is None or isinstance(value, int) else tuple(value)


def _read_string_keys(name: str) -> Callable[[Any, str], Any]:
    def read(value: Any, where: str) -> Any:
        if not all(isinstance(k, str) for k in value):
            raise ModelLoadError(f"{where}: recipe field {name!r} must be a table with string keys")
        return value
    return read


def _read_leaves(value: Any, where: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) for v in value):
        raise ModelLoadError(f"{where}: recipe field 'leaf_modules' must be a list of strings")
    return tuple(value)


def _read_input_size(size: Any, where: str) -> tuple[int, ...] | None:
    """A recipe's input size: 1 to 3 integers >= 1 (S, (H, W) or (C, H, W)) whose product is
    within ``Limits.input_elements``."""
    if size is None:
        return None
    if not (1 <= len(size) <= 3 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise ModelLoadError(f"{where}: recipe field 'input_size' is {excerpt(list(size), 60)}; valid: 1 to 3 "
                             "integers >= 1 (S, [H, W] or [C, H, W])")
    elements = 1
    for v in size:
        elements *= v
    if len(size) < 3:
        elements *= size[-1] if len(size) == 1 else 1  # S means S x S
    cap = current_limits().input_elements
    if elements > cap:
        raise ModelLoadError(f"{where}: recipe field 'input_size' {list(size)} asks for {elements} elements per "
                             f"image, over the limit of {cap} (Limits.input_elements)")
    return tuple(size)


def _read_scores(value: Any, where: str) -> SiteScores | None:
    return None if value is None else SiteScores.from_dict(value)


def _write_leaves(value: tuple[LeafSpec, ...]) -> list[str]:
    return [leaf_name(m) for m in value]


def _write_scores(value: SiteScores | None) -> Any:
    return None if value is None else value.to_dict()


def _write_size(value: Any) -> Any:
    return value if isinstance(value, int) else plain_data(value)


def _option(default: Any = None, *, json: tuple[type, ...], check: Callable[[Any], Any] | None = None,
            read: Callable[[Any, str], Any] | None = None, write: Callable[[Any], Any] | None = None,
            factory: Callable[[], Any] | None = None) -> Any:
    """A field of :class:`RetrofitOptions`: its default, the JSON types a recipe may hold for
    it, the check of a caller's value, how a recipe's value is read and how it is written."""
    meta = {"json": json, "check": check, "read": read, "write": write}
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


_NONE = type(None)


@dataclass(frozen=True)
class RetrofitOptions:
    """How attention is inserted, beyond which rules choose the sites. Frozen; compare two
    with ``==``; :meth:`replace` gives a changed copy.

    Attributes:
        gate: ``"identity"`` or ``"sigmoid"`` for every rule; None: each rule's own.
        attn_args: attention constructor arguments that override the rules' ``args``
            (``{"rd_ratio": 0.25}``); read-only.
        input_size: ``(C, H, W)``, ``(H, W)`` or an int, for shapes and the identity check;
            None: timm's ``pretrained_cfg``, else 224x224.
        leaf_modules: modules not to trace into (classes, class names or module paths).
        strict: a rule glob that matches no site is an error (default: a warning, kept in
            the report).
        on_existing: where the model already has attention (timm's ``seresnet50``, an
            earlier retrofit): ``"skip"`` leaves the site alone, ``"stack"`` adds another;
            None: each rule's own (skip by default).
        fuse: a gating module (SE, ECA, CBAM) right before an out-of-place residual add
            computes only its gate, and one ``torch.addcmul`` does its multiply and the add
            (same outputs, one less pass over the activation); False calls the module.
        keep_class: keep the model's class: trace and rewrite its submodules, never its own
            forward (sites in that forward are then out of reach; the report says which).
        scores: site scores from :func:`retrofit.score_sites`, for rules that select sites
            by score (``select = { top = 4 }``, ``budget = { params = 0.02 }``); kept in the
            recipe, so a save loads with the same choice.
    """

    gate: str | None = _option(None, json=(str, _NONE), check=_one_of("gate", GATES))
    attn_args: Mapping[str, Any] = _option(factory=dict, json=(dict,), check=_table,
                                           read=_read_string_keys("attn_args"))
    input_size: int | tuple[int, ...] | None = _option(None, json=(list, tuple, _NONE), check=_size,
                                                       read=_read_input_size, write=_write_size)
    leaf_modules: tuple[LeafSpec, ...] = _option((), json=(list, tuple), check=tuple, read=_read_leaves,
                                                 write=_write_leaves)
    strict: bool = _option(False, json=(bool,))
    on_existing: str | None = _option(None, json=(str, _NONE), check=_one_of("on_existing", ON_EXISTING))
    fuse: bool = _option(True, json=(bool,))
    keep_class: bool = _option(False, json=(bool,))
    scores: SiteScores | None = _option(None, json=(dict, _NONE), read=_read_scores, write=_write_scores)

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata["check"]
            if check is not None:
                object.__setattr__(self, f.name, check(getattr(self, f.name)))

    @classmethod
    def of(cls, options: RetrofitOptions | None = None, /, **overrides: Any) -> RetrofitOptions:
        """``options`` (default: every default) with the fields ``overrides`` names changed:
        what the functions that take ``options=`` and keyword options build.

        Raises:
            OptionError: an override that is not an option, or a value that is not valid.
        """
        if options is not None and not isinstance(options, RetrofitOptions):
            raise OptionError(f"options must be a RetrofitOptions, not a {type(options).__name__}")
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise OptionError(f"unknown option(s) {', '.join(map(repr, unknown))} (valid: {', '.join(cls.names())})")
        return (options or cls()).replace(**overrides)

    def replace(self, **changes: Any) -> RetrofitOptions:
        """A copy with some options changed."""
        return replace(self, **changes)

    def recorded(self) -> RetrofitOptions:
        """These options as a recipe records them: leaf classes by name (``module:QualName``)."""
        return self.replace(leaf_modules=tuple(leaf_name(m) for m in self.leaf_modules))

    def differences(self, other: RetrofitOptions) -> list[tuple[str, Any, Any]]:
        """``(name, this value, other's value)`` for each option the two records set apart."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready), as a recipe records the options; leaf classes as
        ``module:QualName``, scores as their table."""
        out = {}
        for f in fields(self):
            write = f.metadata["write"] or plain_data
            out[f.name] = write(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> RetrofitOptions:
        """Read the options a recipe holds (fields not in ``d`` take their defaults),
        checking each one's type and value.

        Raises:
            ModelLoadError: naming the field and what is wrong with it.
        """
        values = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            value = d[f.name]
            if not isinstance(value, f.metadata["json"]):
                raise ModelLoadError(f"{where}: recipe field {f.name!r} is a {type(value).__name__} "
                                     f"({excerpt(value, 60)})")
            read = f.metadata["read"]
            values[f.name] = value if read is None else read(value, where)
        try:
            return cls(**values)
        except OptionError as e:
            raise ModelLoadError(f"{where}: {e}") from e

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The options' names, in order."""
        return tuple(f.name for f in fields(cls))
