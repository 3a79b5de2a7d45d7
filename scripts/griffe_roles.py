"""A griffe extension for the documentation site (mkdocs.yml): the Sphinx roles of our
docstrings (``:func:`retrofit```, ``:class:`~retrofit.errors.UntrustedCodeError```) become
mkdocstrings cross-references.

The docstrings keep the roles, which ``help()`` and IDEs read as they are; the site turns
each into a link to the object's entry in the API reference, or, for an object the
reference does not show (a private helper, another library's function), into plain code.
A name is resolved as Python would resolve it where the docstring is (``:func:`retrofit```
inside ``retrofit.api`` is ``retrofit.api.retrofit``, shown under its public name
``retrofit.retrofit``); ``~`` shows only the last part of the name, as in Sphinx.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`]+)`")


def _resolve(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as seen from ``obj`` (the name itself if it resolves
    nowhere: another library's)."""
    if "." in target:
        try:
            obj.modules_collection[target]  # an absolute path: `retrofit.rulefile.RuleSet`
            return target
        except Exception:  # noqa: BLE001 - KeyError, alias errors: a relative name, then
            pass
    head, _, rest = target.partition(".")
    scope: Any = obj
    while scope is not None:
        try:
            found = scope.resolve(head)
        except Exception:  # noqa: BLE001 - griffe's NameResolutionError and alias errors alike
            scope = scope.parent
            continue
        return f"{found}.{rest}" if rest else found
    return target


def _link(obj: griffe.Object, match: re.Match[str]) -> str:
    target = match["target"].strip().removesuffix("()")
    title = target.rsplit(".", 1)[-1] if match["tilde"] else target
    identifier = _resolve(obj, target)
    return (f'<autoref identifier="{html.escape(identifier)}" optional>'
            f"<code>{html.escape(title)}</code></autoref>")


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring once the package is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.is_alias or obj.docstring is None or ":" not in obj.docstring.value:
            return
        obj.docstring.value = ROLE.sub(lambda m: _link(obj, m), obj.docstring.value)
