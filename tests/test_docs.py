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


@pytest.mark.docs
def test_site_builds_without_a_warning(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason='the docs extra is not installed: pip install -c constraints.txt -e ".[docs]"')
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    for page in ("index.html", "api/index.html", "rules/index.html", "changelog/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("retrofit.retrofit", "retrofit.load", "retrofit.RetrofitError", "retrofit.finetune.fit"):
        assert f'id="{name}"' in api, name
