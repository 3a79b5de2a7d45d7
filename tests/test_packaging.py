"""What the release says about itself: the distribution's name and version in one place each,
extras under the new name, the license, the changelog, the README's install instructions,
and `retrofit --version`. Building and installing the wheel is tests/test_wheel.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import retrofit

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_name_and_version_are_written_once() -> None:
    project = PYPROJECT["project"]
    assert project["name"] == retrofit.version.DISTRIBUTION == "torch-retrofit"
    assert "version" not in project and project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["hatch"]["version"] == {"path": "retrofit/version.py"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", retrofit.__version__)
    assert project["scripts"] == {"retrofit": "retrofit.cli:main"}


def test_extras_use_the_new_name() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert sorted(extras) == ["docs", "export", "frameworks", "lint", "onnx", "smp", "test", "train",
                              "transformers", "ultralytics"]
    assert extras["export"] == ["torch-retrofit[onnx]"]
    assert extras["frameworks"] == ["torch-retrofit[ultralytics]", "torch-retrofit[transformers]",
                                    "torch-retrofit[smp]"]
    assert extras["test"] == ["pytest>=8", "hypothesis>=6.100", "pytest-xdist>=3.5", "torch-retrofit[train]", "torch-retrofit[onnx]",
                              "torch-retrofit[frameworks]", "torch-retrofit[lint]"]
    text = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r'"retrofit\[', text)  # no extra refers to the project by its old name


def test_license_and_changelog() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith(
        "                                 Apache License\n                           Version 2.0, January 2004\n")
    assert (ROOT / "retrofit" / "py.typed").is_file()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"\n## {retrofit.__version__} " in changelog
    assert "pip install torch-retrofit" in changelog


def test_readme_says_how_to_install_and_ci_runs_its_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "pip install torch-retrofit" in readme
    assert "The distribution named `retrofit` on PyPI is an **unrelated project**" in readme
    for extra in ("torch-retrofit[train]", "torch-retrofit[onnx]", "torch-retrofit[test]"):
        assert extra in readme, extra
    commands = re.findall(r"```bash\n(python3\.11 -m venv .*)\n```", readme)
    assert commands == [
        "python3.11 -m venv .venv && .venv/bin/pip install -c constraints.txt -e . && .venv/bin/retrofit resnet50 "
        "--attn cbam",
        'python3.11 -m venv .venv && .venv/bin/pip install -c constraints.txt -e ".[test]" && .venv/bin/python -m '
        "pytest -q",
    ]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci
    assert ".venv/bin/python -m pytest -q -m wheel" in ci


def _version(env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "retrofit.cli", "--version"], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, timeout=300)


def test_version_names_the_distribution() -> None:
    r = _version()
    assert r.returncode == 0, r.stderr
    assert r.stdout == (f"torch-retrofit {retrofit.__version__} from {ROOT / 'retrofit'} (torch {torch.__version__}, "
                        f"torchvision {torchvision.__version__}, timm {timm.__version__}; Python "
                        f"{sys.version.split()[0]})\n")


def test_version_warns_about_the_other_retrofit(tmp_path: Path) -> None:
    """PyPI's `retrofit` 0.3.3 is another project; its metadata, as pip would install it."""
    info = tmp_path / "retrofit-0.3.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.4\nName: retrofit\nVersion: 0.3.3\n"
                                   "Summary: High-Performance ML Training, Scoring & Evaluation (Polars + GPU-Ready)\n")
    r = _version({"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"torch-retrofit {retrofit.__version__} from ")
    assert r.stderr == (
        "warning: the distribution 'retrofit' 0.3.3 (High-Performance ML Training, Scoring & Evaluation (Polars + "
        "GPU-Ready)) is installed in this environment too; it is not torch-retrofit, but it installs files under the "
        "same import name `retrofit`, so each can overwrite the other's. Run `pip uninstall retrofit`, then "
        "`pip install --force-reinstall torch-retrofit`\n"
    )


@pytest.mark.parametrize("argv", [["--version"], ["resnet18", "--version"]])
def test_version_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from retrofit.cli import main

    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"torch-retrofit {retrofit.__version__} from ")
