"""Rule files: TOML data that says which attention goes on which sites.

A file holds one or more ``[[rule]]`` tables (see ``rules/README.md``). Rules are plain
frozen data; :mod:`retrofit.plan` applies them to a model's sites.
"""

from __future__ import annotations

import difflib
import inspect
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .attention import GATES, check_reduction_args, get_attention, list_attention
from .errors import ModelLoadError, RetrofitError, RuleError
from .options import ON_EXISTING
from .readfile import open_regular
from .sites import SITE_KINDS

__all__ = ["Rule", "RuleSet", "load_rules", "parse_rules", "builtin_rules_dir", "list_builtin_rules", "resolve_rules",
           "default_rules_doc"]

POSITIONS: dict[str, tuple[str, ...]] = {
    "residual-add": ("branch", "after", "mid"),
    "conv-block": ("after",),
}
CONFLICTS: tuple[str, ...] = ("error", "keep", "replace", "stack")

# key -> (accepted types, default); `at` and `attn` have no default.
_RULE_KEYS: dict[str, tuple[tuple[type, ...], Any]] = {
    "at": ((str,), None),
    "attn": ((str,), None),
    "args": ((dict,), {}),
    "position": ((str,), None),
    "gate": ((str,), "identity"),
    "include": ((list,), ["*"]),
    "exclude": ((list,), []),
    "output_of": ((list,), None),
    "input_of": ((list,), None),
    "min_channels": ((int,), None),
    "max_channels": ((int,), None),
    "min_size": ((int,), None),
    "max_size": ((int,), None),
    "stages": ((list,), None),
    "blocks": ((list,), None),
    "every": ((int,), None),
    "first": ((int,), None),
    "last": ((int,), None),
    "fallback": ((bool,), False),
    "conflict": ((str,), "error"),
    "on_existing": ((str,), "skip"),
    "select": ((dict,), None),
    "budget": ((dict,), None),
}
# Selection by score (retrofit.score_sites): `select = { top = 4 }` keeps the 4 best-scored
# sites; `budget = { params = 0.02 }` (or `flops`) the best-scored sites within that
# fraction of the model's parameters (FLOPs).
BUDGETS: tuple[str, ...] = ("params", "flops")
_POSITIVE = ("min_channels", "max_channels", "min_size", "max_size", "every", "first", "last")
_FILE_KEYS = {"rule", "description"}
MAX_RULE_FILE_BYTES = 2**20  # a rule file is a few [[rule]] tables; anything longer is not one


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]`` table: attention ``attn`` on sites of kind ``at``."""

    at: str  # site kind the rule applies to
    attn: str  # registered attention name
    args: Mapping[str, Any] = field(default_factory=dict)  # attention constructor arguments
    position: str = "branch"  # where on the site: "branch" (before the add) or "after"
    gate: str = "identity"  # gate form: "identity" or "sigmoid"
    include: tuple[str, ...] = ("*",)  # fnmatch globs on the site path; a site must match one
    exclude: tuple[str, ...] = ()  # fnmatch globs on the site path; a match removes the site
    output_of: tuple[str, ...] | None = None  # class globs: keep sites whose tensor a module of such a class returns
    input_of: tuple[str, ...] | None = None  # class globs: keep sites whose tensor such a module takes as input
    min_channels: int | None = None  # keep sites with at least this many channels
    max_channels: int | None = None  # keep sites with at most this many channels
    min_size: int | None = None  # keep sites whose H and W are both at least this
    max_size: int | None = None  # keep sites whose H and W are both at most this
    stages: tuple[int, ...] | None = None  # keep these 1-based stages (negative: from the last)
    blocks: tuple[int, ...] | None = None  # keep these 0-based blocks of each stage (negative: from the end)
    every: int | None = None  # then keep every n-th remaining site (1st, n+1-th, ...)
    first: int | None = None  # then keep the first k
    last: int | None = None  # then keep the last k
    fallback: bool = False  # applies only if no earlier rule selected a site
    conflict: str = "error"  # on a site an earlier rule selected: error, keep, replace or stack
    on_existing: str = "skip"  # where the model already has attention: skip, or stack another
    top: int | None = None  # select = { top = k }: then keep the k sites with the best scores
    budget: tuple[str, float] | None = None  # budget = { params = f }: best scores within f of the model
    source: str = "<rules>"  # where the rule came from: "file.toml, rule 2"

    @property
    def by_score(self) -> bool:
        """The rule chooses among its sites by score (it needs :func:`retrofit.score_sites`)."""
        return self.top is not None or self.budget is not None


@dataclass(frozen=True)
class RuleSet:
    """The rules of one file, in the order they apply."""

    rules: tuple[Rule, ...]  # in file order; earlier rules claim sites first
    name: str = "<rules>"  # file path or built-in name
    description: str = ""  # one line, from the file's `description`
    doc: Mapping[str, Any] = field(default_factory=dict)  # the parsed TOML, to save and re-parse

    def unlimited(self) -> RuleSet:
        """The same rules without selection by score (``select``, ``budget``): every site their
        selectors keep, the candidates :func:`retrofit.score_sites` scores."""
        return replace(self, rules=tuple(replace(r, top=None, budget=None) for r in self.rules))

    def selecting(self, top: int | None = None, budget: tuple[str, float] | None = None) -> RuleSet:
        """The same rules, each choosing by score: ``select = { top = k }`` or ``budget =
        { params | flops = f }`` in every rule (what the CLI's ``--budget`` does).

        Raises:
            RuleError: ``top`` below 1, an unknown budget kind, or a fraction outside (0, 1].
        """
        doc = dict(self.doc)
        tables = []
        for table in doc.get("rule", []):
            t = {k: v for k, v in table.items() if k not in ("select", "budget")}
            if top is not None:
                t["select"] = {"top": top}
            if budget is not None:
                t["budget"] = {budget[0]: budget[1]}
            tables.append(t)
        doc["rule"] = tables
        what = f"top = {top}" if top is not None else f"{budget[0]} = {budget[1]:g}" if budget else "nothing"
        return parse_rules(doc, f"{self.name} (select {what})")


def _type_name(types: tuple[type, ...]) -> str:
    names = {str: "a string", dict: "a table", list: "an array", bool: "true or false", int: "an integer"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _unknown(key: str, valid: set[str] | dict[str, Any], where: str) -> RuleError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return RuleError(f"{where}: unknown key {key!r}{hint} (valid: {', '.join(sorted(valid))})")


def _parse_rule(table: Mapping[str, Any], where: str) -> Rule:
    values = _typed_values(table, where)
    _check_lists(values, where)
    _check_choices(values, where)
    position = _check_attention(values, where)
    # Arrays become tuples (a rule is frozen); the optional ones stay None when absent.
    arrays: dict[str, Any] = {k: None if values[k] is None else tuple(values[k])
                              for k in ("include", "exclude", "output_of", "input_of", "stages", "blocks")}
    plain: dict[str, Any] = {k: values[k] for k in ("at", "attn", "gate", "min_channels", "max_channels", "min_size",
                                                    "max_size", "every", "first", "last", "fallback", "conflict",
                                                    "on_existing")}
    return Rule(**plain, **arrays, args=MappingProxyType(dict(values["args"])), position=position,
                top=_select(values["select"], where), budget=_budget(values["budget"], where), source=where)


def _typed_values(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Every key of a rule table, its default where absent, each of its type."""
    for key in table:
        if key not in _RULE_KEYS:
            raise _unknown(key, _RULE_KEYS, where)
    for key in ("at", "attn"):
        if key not in table:
            raise RuleError(f"{where}: missing required key {key!r}")
    values: dict[str, Any] = {}
    for key, (types, default) in _RULE_KEYS.items():
        value = table.get(key, default)
        # TOML booleans are Python bools, which are ints too; a count is never true/false.
        wrong = value is not None and (not isinstance(value, types) or (bool not in types and isinstance(value, bool)))
        if wrong:
            raise RuleError(f"{where}: {key!r} must be {_type_name(types)}, got {value!r}")
        if key in _POSITIVE and value is not None and value < 1:
            raise RuleError(f"{where}: {key!r} must be at least 1, got {value}")
        values[key] = value
    return values


def _check_lists(values: Mapping[str, Any], where: str) -> None:
    """What a rule's arrays hold: stage and block numbers, globs."""
    for key in ("stages", "blocks"):
        if values[key] is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in values[key]):
            raise RuleError(f"{where}: {key!r} must be an array of integers, got {values[key]!r}")
    if 0 in (values["stages"] or ()):
        raise RuleError(f"{where}: stages are numbered from 1 (or -1 for the last), got 0")
    for key in ("include", "exclude", "output_of", "input_of"):
        if values[key] is not None and not all(isinstance(g, str) for g in values[key]):
            raise RuleError(f"{where}: {key!r} must be an array of strings (globs), got {values[key]!r}")


def _check_choices(values: Mapping[str, Any], where: str) -> None:
    """A rule's keys that name one of a few choices."""
    if values["on_existing"] not in ON_EXISTING:
        raise RuleError(
            f"{where}: on_existing = {values['on_existing']!r} is not valid (valid: {', '.join(ON_EXISTING)})"
        )
    if values["conflict"] not in CONFLICTS:
        raise RuleError(f"{where}: conflict = {values['conflict']!r} is not valid (valid: {', '.join(CONFLICTS)})")
    if values["at"] not in SITE_KINDS:
        raise RuleError(f"{where}: unknown site kind at = {values['at']!r} (valid: {', '.join(SITE_KINDS)})")


def _check_attention(values: Mapping[str, Any], where: str) -> str:
    """The rule's attention type, its arguments and gate checked; its position (the site
    kind's default where the rule names none)."""
    at = values["at"]
    try:
        cls = get_attention(values["attn"])
    except RetrofitError as e:
        raise RuleError(f"{where}: {e}") from None
    _check_args(cls, values["attn"], values["args"], where)
    position: str = values["position"] or POSITIONS[at][0]
    if position not in POSITIONS[at]:
        raise RuleError(
            f"{where}: position = {position!r} is not valid for {at} sites (valid: {', '.join(POSITIONS[at])})"
        )
    if values["gate"] not in GATES:
        raise RuleError(f"{where}: unknown gate {values['gate']!r} (valid: {', '.join(GATES)})")
    return position


def _select(select: Mapping[str, Any] | None, where: str) -> int | None:
    if select is None:
        return None
    if set(select) != {"top"}:
        raise RuleError(f"{where}: select must be {{ top = K }} (the K best-scored sites), got {dict(select)!r}")
    top = select["top"]
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise RuleError(f"{where}: select.top must be an integer of at least 1, got {top!r}")
    return top


def _budget(budget: Mapping[str, Any] | None, where: str) -> tuple[str, float] | None:
    if budget is None:
        return None
    if len(budget) != 1 or next(iter(budget)) not in BUDGETS:
        raise RuleError(f"{where}: budget must be one of {{ params = F }} or {{ flops = F }} (a fraction of the "
                        f"model's), got {dict(budget)!r}")
    kind, value = next(iter(budget.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise RuleError(f"{where}: budget.{kind} is a fraction of the model's {kind} in (0, 1] "
                        f"(0.02 for 2%), got {value!r}")
    return kind, float(value)


_RESERVED_ARGS = ("channels", "gate", "device", "dtype")


def _check_args(cls: type, attn: str, args: Mapping[str, Any], where: str) -> None:
    """Reject attention arguments the class does not take, before anything is built."""
    for key in _RESERVED_ARGS:
        if key in args:
            raise RuleError(f"{where}: args.{key} is set by retrofit, not by a rule (use the rule's own keys)")
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = [n for n in params
                 if n not in _RESERVED_ARGS and params[n].kind is not inspect.Parameter.VAR_POSITIONAL]
        for key in args:
            if key not in params:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise RuleError(
                    f"{where}: attention {attn!r} takes no argument {key!r}{hint} (valid: {', '.join(valid)})"
                )
    # timm's bottleneck arguments mean the same in every attention type; a value out of range
    # (rd_ratio = 0) would otherwise be rounded into a width without a word. Other values are
    # checked when the plan builds each module (retrofit.plan), naming this rule too.
    try:
        check_reduction_args(attn, args)
    except RetrofitError as e:
        raise RuleError(f"{where}: {e}") from None


def parse_rules(doc: Mapping[str, Any], name: str = "<rules>") -> RuleSet:
    """Validate a parsed TOML document and turn it into a :class:`RuleSet`.

    Raises:
        RuleError: an unknown key, a wrong type, an unknown site kind, attention, position
            or gate; the message names the file and the rule.
    """
    for key in doc:
        if key not in _FILE_KEYS:
            raise _unknown(key, _FILE_KEYS, name)
    tables = doc.get("rule", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RuleError(f"{name}: 'rule' must be an array of tables, written [[rule]]")
    if not tables:
        raise RuleError(f"{name}: no [[rule]] table; a rule file needs at least one")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise RuleError(f"{name}: 'description' must be a string")
    rules = tuple(_parse_rule(t, f"{name}, rule {i}") for i, t in enumerate(tables, 1))
    return RuleSet(rules, name, description, MappingProxyType(dict(doc)))


def load_rules(path: str | Path, name: str | None = None) -> RuleSet:
    """Read and validate a rule file; ``name`` is how messages refer to it (default: the path).

    Raises:
        RuleError: the file is missing or unreadable, longer than
            :data:`MAX_RULE_FILE_BYTES`, not UTF-8, not valid TOML (file and line in the
            message), nested too deeply to parse, or its rules are invalid.
    """
    path = Path(path)
    try:
        # The reader every file from others goes through: a FIFO is refused at once (never
        # waited on), a device or socket too; the size is capped here, read by read.
        with open_regular(path, f"rule file {str(path)!r}", 1 << 62, "json_bytes") as (f, _):
            data = f.read(MAX_RULE_FILE_BYTES + 1)
    except ModelLoadError as e:
        raise RuleError(str(e)) from e
    except OSError as e:
        raise RuleError(f"cannot read rule file {str(path)!r}: {e.strerror or e}") from e
    if len(data) > MAX_RULE_FILE_BYTES:
        raise RuleError(f"{path}: longer than {MAX_RULE_FILE_BYTES // 2**20} MiB; not a rule file (rule files are "
                        "TOML text of a few [[rule]] tables)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RuleError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); a rule file is "
                        "TOML, which is UTF-8") from e
    try:
        doc = tomllib.loads(text)
        return parse_rules(doc, name or str(path))
    except tomllib.TOMLDecodeError as e:
        raise RuleError(f"{path}: TOML syntax error: {e}") from e
    except RecursionError as e:  # tomllib recurses once per nested array or table
        raise RuleError(f"{path}: arrays or tables nested too deeply to read; rule files nest a few levels "
                        "(rule -> args -> value)") from e


def builtin_rules_dir() -> Path:
    """The folder of built-in rule files: inside the installed package, or the checkout's ``rules/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "rules", here.parent / "rules"):
        if candidate.is_dir():
            return candidate
    raise RetrofitError(f"built-in rule files not found next to {here}; the installation is incomplete")


def list_builtin_rules() -> dict[str, str]:
    """``{name: description}`` of the built-in rule sets."""
    out = {}
    for path in sorted(builtin_rules_dir().glob("*.toml")):
        out[path.stem] = load_rules(path, f"built-in {path.stem!r}").description
    return out


def _known_name(name: str) -> str:
    """``name`` as a built-in rule set or attention type is spelled, where it differs only in
    case and only one is meant (``"SE"``: ``"se"``); else ``name`` as given."""
    known = {p.stem for p in builtin_rules_dir().glob("*.toml")} | set(list_attention())
    if name in known:
        return name
    same = [k for k in known if k.lower() == name.lower()]
    return same[0] if len(same) == 1 else name


def _is_attention(name: str) -> bool:
    try:
        get_attention(name)
    except RetrofitError:
        return False
    return True


def default_rules_doc(attn: str) -> dict[str, Any]:
    """The default placement of an attention type without a rule file of its own: before
    every residual add; after every conv block in plain CNNs."""
    return {"description": f"{attn} on every residual branch before the add; after every conv block in plain CNNs",
            "rule": [{"at": "residual-add", "attn": attn}, {"at": "conv-block", "attn": attn, "fallback": True}]}


def resolve_rules(attn: str | None = None, rules: str | Path | RuleSet | None = None) -> RuleSet:
    """The rule set for ``retrofit(attn=..., rules=...)``.

    ``rules`` (a file path or a RuleSet) wins; otherwise ``attn`` names a built-in rule file,
    or a registered attention type without one, which gets the default placement (before
    every residual add; after every conv block in plain CNNs).

    Raises:
        RuleError: neither is given, or ``attn`` names no built-in rule set (the message
            lists them and the closest match).
    """
    if isinstance(rules, RuleSet):
        return rules
    if rules is not None:
        return load_rules(rules)
    if attn is None:
        raise RuleError("give attn='se' (a built-in rule set) or rules='file.toml'")
    attn = _known_name(attn)
    path = builtin_rules_dir() / f"{attn}.toml"
    if not path.is_file() and _is_attention(attn):
        # A registered type without a rule file of its own: the default placement.
        return parse_rules(default_rules_doc(attn), f"default placement for {attn!r}")
    if not path.is_file():
        names = sorted(p.stem for p in builtin_rules_dir().glob("*.toml"))
        close = difflib.get_close_matches(attn, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RuleError(
            f"unknown attention rule set {attn!r}{hint} (built-in: {', '.join(names)}; "
            f"attention types: {', '.join(list_attention())}); or pass rules='file.toml'"
        )
    return load_rules(path, f"built-in {attn!r}")
