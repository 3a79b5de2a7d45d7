"""The public surface: what ``retrofit.__all__`` and the public submodules' ``__all__`` list
is exactly what the API reference (docs/api.md) documents; every other module's ``__all__``
lists only what the rest of the package imports from it (a helper only tests use is not
exported); and the guides name only public objects.

These read files and import the package: no model is built. The rendered reference is
checked by tests/test_docs.py (``-m docs``).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import retrofit

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "retrofit"
API_PAGE = ROOT / "docs" / "api.md"

# The submodules the guides tell users to import themselves (`import retrofit.finetune`):
# their `__all__` is public, as is `retrofit.__all__`. Every other module is internal.
PUBLIC_SUBMODULES = ("retrofit.attention", "retrofit.optim", "retrofit.finetune", "retrofit.data",
                     "retrofit.distributed", "retrofit.gates", "retrofit.publish", "retrofit.ultralytics")

# Pages for contributors, which name internal modules on purpose, and the changelog, which
# keeps the names things had when they changed.
NOT_GUIDES = ("architecture.md", "changelog.md", "api.md")


def _object(path: str) -> Any:
    """The object a dotted identifier names (``retrofit.finetune.fit``): the longest prefix
    that imports, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def _public() -> dict[str, Any]:
    """Every public name, spelled as a user writes it, and its object."""
    out: dict[str, Any] = {f"retrofit.{n}": getattr(retrofit, n) for n in retrofit.__all__ if not n.startswith("__")}
    for module in PUBLIC_SUBMODULES:
        mod = importlib.import_module(module)
        out[module] = mod
        out.update({f"{module}.{n}": getattr(mod, n) for n in mod.__all__})
    return out


def _directives() -> Iterator[tuple[str, list[str] | None]]:
    """Each ``::: identifier`` of docs/api.md with the members its options name (None: all)."""
    lines = API_PAGE.read_text().splitlines()
    for i, line in enumerate(lines):
        if m := re.fullmatch(r":::\s+(\S+)\s*", line):
            members = None
            for option in lines[i + 1:]:
                if not option.startswith(" ") or not option.strip():
                    break
                if found := re.fullmatch(r"\s+members:\s*\[(.*)\]\s*", option):
                    members = [n.strip() for n in found[1].split(",") if n.strip()]
            yield m[1], members


def _documented() -> dict[str, Any]:
    """What docs/api.md documents: each object directive, and a module's `__all__` (or the
    members its options name)."""
    out = {}
    for name, members in _directives():
        obj = _object(name)
        out[name] = obj
        if isinstance(obj, types.ModuleType):
            for member in members if members is not None else getattr(obj, "__all__", []):
                out[f"{name}.{member}"] = getattr(obj, member)
    return out


def test_the_api_reference_is_the_public_api() -> None:
    """docs/api.md documents every public object, and nothing else (each once, under the
    name a user writes or as the object its re-export is: `retrofit.register_attention` is
    `retrofit.attention.register_attention`)."""
    public, documented = _public(), _documented()
    public_ids, documented_ids = {id(o) for o in public.values()}, {id(o) for o in documented.values()}
    missing = sorted(n for n, o in public.items() if id(o) not in documented_ids)
    extra = sorted(n for n, o in documented.items() if id(o) not in public_ids)
    assert missing == [], f"public names with no entry in docs/api.md: {missing}"
    assert extra == [], f"docs/api.md documents names that are not public (not in an __all__ of the public API): {extra}"
    internal = [n for n, o in documented.items() if isinstance(o, types.ModuleType) and n not in PUBLIC_SUBMODULES]
    assert internal == [], f"docs/api.md shows internal modules whole: {internal}"


def test_the_top_level_is_what_the_guides_call() -> None:
    """`retrofit.__all__` names what a user calls or catches, each importable, and no
    submodule (those are imported by name: `import retrofit.finetune`)."""
    assert len(retrofit.__all__) == len(set(retrofit.__all__))
    star: dict[str, Any] = {}
    exec("from retrofit import *", star)
    assert sorted(k for k in star if k != "__builtins__") == sorted(retrofit.__all__)
    assert [n for n in retrofit.__all__ if isinstance(getattr(retrofit, n), types.ModuleType)] == []
    assert isinstance(retrofit.attention, types.ModuleType)  # still there as an attribute


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_by_module() -> dict[str, set[tuple[str, str]]]:
    """For each module of the package, the ``(module, name)`` pairs it takes from others:
    ``from .x import name``, and ``x.name`` where ``x`` is a module it imported."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    out: dict[str, set[tuple[str, str]]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        taken: set[tuple[str, str]] = set()
        aliases: dict[str, str] = {}
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    taken.add((source, alias.name))
                    if f"{source}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                taken.add((aliases[node.value.id], node.attr))
        out[module] = taken
    return out


def test_internal_modules_export_only_what_the_package_imports() -> None:
    """An internal module's `__all__` is its interface to the rest of the package: each
    name in it is imported by another module of the package. A helper that only tests use
    is not exported (tests import it from its module knowingly)."""
    imports = _imports_by_module()
    public = {"retrofit", *PUBLIC_SUBMODULES}
    unused = []
    for info in pkgutil.walk_packages(retrofit.__path__, "retrofit."):
        if info.name in public:
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            if not any((info.name, name) in taken for other, taken in imports.items() if other != info.name):
                unused.append(f"{info.name}.{name}")
    assert unused == [], f"exported by an internal module but imported by no other module of the package: {unused}"


def _guides() -> list[Path]:
    pages = [p for p in (ROOT / "docs").rglob("*.md") if p.name not in NOT_GUIDES]
    return [ROOT / "README.md", *sorted(pages)]


@pytest.mark.parametrize("page", _guides(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_guides_name_only_public_objects(page: Path) -> None:
    """A dotted name a guide gives (`retrofit.finetune.fit`, `retrofit.SiteScores.from_dict`)
    is public: the API reference has it, or it is an attribute of what it has."""
    public = _public()
    wrong = []
    for name in sorted(set(re.findall(r"(?<![\w/.-])retrofit(?:\.[A-Za-z_]\w*)+", page.read_text()))):
        parts = name.split(".")
        if parts[-1] in ("py", "toml", "md", "yaml", "json", "pt"):  # a file (`retrofit.toml`)
            continue
        prefixes = [".".join(parts[:i]) for i in range(2, len(parts) + 1)]
        if not any(p in public for p in prefixes):
            wrong.append(name)
    assert wrong == [], f"{page.relative_to(ROOT)} names objects that are not public: {wrong}"
