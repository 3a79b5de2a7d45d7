"""The documentation: a short README, and a site (mkdocs.yml, docs/) whose pages all exist
and which builds without a warning.

The build is marked `docs` and left out of the default run (it needs the docs extra:
`pip install -c constraints.txt -e ".[docs]"`); run it with `pytest -m docs`. CI builds the
site directly (.ci/run).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .test_public_api import PUBLIC_SUBMODULES, _object

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
DOCS = ROOT / CONFIG.get("docs_dir", "docs")


def _nav_pages(entry: Any) -> Iterator[str]:
    """Every page path of a nav: a string, a list, or a one-key mapping of title to either."""
    if isinstance(entry, str):
        yield entry
    elif isinstance(entry, list):
        for item in entry:
            yield from _nav_pages(item)
    elif isinstance(entry, dict):
        for value in entry.values():
            yield from _nav_pages(value)
    else:
        raise TypeError(f"mkdocs.yml: a nav entry must be a page, a list or a title: {entry!r}")


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; at most 200 (move the rest to a page under docs/)"


def test_readme_frameworks_table_is_the_measured_one() -> None:
    """The README's frameworks table is the one scripts/framework_table.py wrote, row for row."""
    measured = (ROOT / "docs" / "frameworks" / "table.md").read_text().split("\n\n")[0].strip().splitlines()
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(measured) == 5 and all(row in readme for row in measured)


def test_every_page_of_the_nav_exists() -> None:
    pages = [p for p in _nav_pages(CONFIG["nav"]) if not re.match(r"[a-z]+://", p)]
    assert pages and all(p.endswith(".md") for p in pages), pages
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert missing == [], f"pages named in mkdocs.yml's nav that are not under {DOCS.name}/: {missing}"
    assert len(set(pages)) == len(pages), "a page appears twice in the nav"


def test_every_snippet_exists() -> None:
    """Pages that include a file of the repository (`--8<-- "CHANGELOG.md"`) name one that is there."""
    for page in DOCS.rglob("*.md"):
        for name in re.findall(r'^--8<-- "([^"]+)"$', page.read_text(), flags=re.M):
            assert (ROOT / name).is_file(), f"{page.relative_to(ROOT)} includes {name}, which does not exist"


def test_the_nav_reads_in_a_newcomers_order() -> None:
    """Start, then the guides, the frameworks, the reference, the experiments: the order a
    new user reads in; the tutorial is in Start."""
    sections = [next(iter(entry)) for entry in CONFIG["nav"]]
    assert sections == ["Start", "Guides", "Frameworks", "Reference", "Experiments"]
    assert "tutorial.md" in list(_nav_pages(CONFIG["nav"][0]))


def _titles() -> dict[str, str]:
    """Each nav page's title as a reader sees it: its first heading, else its nav title."""
    def walk(entry: Any, title: str | None = None) -> Iterator[tuple[str, str | None]]:
        if isinstance(entry, str):
            yield entry, title
        elif isinstance(entry, list):
            for item in entry:
                yield from walk(item)
        else:
            for key, value in entry.items():
                yield from walk(value, key)

    out = {}
    for page, title in walk(CONFIG["nav"]):
        text = (DOCS / page).read_text()
        heading = re.search(r"^# (.+)$", text, flags=re.M)
        out[page] = heading[1].strip() if heading and not text.startswith("--8<--") else (title or page)
    return out


def test_page_titles_are_unique() -> None:
    titles = _titles()
    seen: dict[str, list[str]] = {}
    for page, title in titles.items():
        seen.setdefault(title, []).append(page)
    assert {t: p for t, p in seen.items() if len(p) > 1} == {}
    navs = [t for t in re.findall(r"^\s*- (.+?): \S+\.md$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)]
    assert len(set(navs)) == len(navs), navs


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with `mkdocs build --strict`."""
    pytest.importorskip("mkdocs", reason='the docs extra is not installed: pip install -c constraints.txt -e ".[docs]"')
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return out


@pytest.mark.docs
@pytest.mark.xdist_group("site")  # one worker builds the site, once
def test_site_builds_without_a_warning(site: Path) -> None:
    for page in ("index.html", "api/index.html", "rules/index.html", "changelog/index.html", "tutorial/index.html"):
        assert (site / page).is_file(), page
    api = (site / "api" / "index.html").read_text()
    for name in ("retrofit.retrofit", "retrofit.load", "retrofit.RetrofitError", "retrofit.finetune.fit"):
        assert f'id="{name}"' in api, name


@pytest.mark.docs
@pytest.mark.xdist_group("site")  # one worker builds the site, once
def test_no_raw_sphinx_roles_in_the_site(site: Path) -> None:
    """Docstrings keep their Sphinx roles; the site shows them as links (or code), never as
    `:func:` text. One role the reference does show is a link to its entry."""
    raw = {str(page.relative_to(site)): sorted(set(re.findall(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc):", t)))
           for page in site.rglob("*.html") if ":" in (t := page.read_text())}
    assert {page: roles for page, roles in raw.items() if roles} == {}
    api = (site / "api" / "index.html").read_text()
    # analyze's docstring: "(see :func:`retrofit`)", resolved to retrofit.api.retrofit, shown as retrofit.retrofit
    assert re.search(r'<a class="autorefs autorefs-internal"[^>]*href="#retrofit\.retrofit"[^>]*><code>retrofit</code></a>',
                     api)


@pytest.mark.docs
@pytest.mark.xdist_group("site")  # one worker builds the site, once
def test_the_api_reference_shows_every_public_object(site: Path) -> None:
    """Every name of `retrofit.__all__` and of the public submodules' `__all__` has an entry
    in the rendered API reference, under its own name or as the object documented elsewhere
    there (`retrofit.register_attention` is `retrofit.attention.register_attention`); that
    docs/api.md names nothing else is tests/test_public_api.py's check."""
    import importlib

    import retrofit

    api = (site / "api" / "index.html").read_text()
    documented = {id(_object(i)) for i in re.findall(r'id="(retrofit(?:\.\w+)*)"', api)}
    expected = [f"retrofit.{n}" for n in retrofit.__all__ if not n.startswith("__")]
    for module in PUBLIC_SUBMODULES:
        expected += [f"{module}.{n}" for n in importlib.import_module(module).__all__]
    missing = [name for name in expected if id(_object(name)) not in documented]
    assert missing == [], f"public objects with no entry in docs/api.md: {missing}"
