"""The built wheel works on its own.

`python -m build` makes the sdist and, from it, the wheel (so the sdist is complete enough
to build from), with the build tools pinned by constraints.txt. The wheel is installed, not
editable, with the pinned dependencies into a fresh virtual environment, and everything
below runs there from a folder outside the source tree, with no PYTHONPATH: the command
line, an import of every public name of every module, the built-in rule files, and a Hub
save read offline. Anything the package reads at run time must therefore come from the
wheel.

Marked `wheel` and left out of the default run: about 4 minutes, most of it writing torch's
5.5 GB into the environment and deleting it afterwards (little CPU: 1.5 min on this project's
2-core machine). CI runs it after the default run (.ci/run); run it with `pytest -m wheel`.
"""

from __future__ import annotations

import email.message
import email.parser
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import retrofit

from .conftest import cached

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
VERSION = retrofit.__version__
DIST_INFO = f"torch_retrofit-{VERSION}.dist-info"


def _env(**extra: str) -> dict[str, str]:
    """This environment without anything that would let the source tree or the test
    environment's packages in; bytecode is written (the install compiles none), so only the
    first check compiles what it imports."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PIP_CONSTRAINT", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", **extra}


def _run(cmd: list[str | Path], cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=_env(**env),
                       timeout=timeout)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited with {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


@dataclass
class Installed:
    wheel: Path  # the built wheel
    sdist: Path  # the built sdist
    venv: Path  # the fresh environment the wheel is installed in
    purelib: Path  # its site-packages
    elsewhere: Path  # an empty folder outside the source tree, the working directory of every check
    seconds: dict[str, float] = field(default_factory=dict)  # how long building and installing took

    def python(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        # -I: isolated mode, no PYTHONPATH, no user site, no script folder on sys.path
        return _run([self.venv / "bin" / "python", "-I", "-c", script, *args], self.elsewhere, 600, **env)

    def retrofit(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return _run([self.venv / "bin" / "retrofit", *args], self.elsewhere, 600, **env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("wheel")
    elsewhere, dist = base / "elsewhere", base / "dist"
    elsewhere.mkdir()
    seconds = {}
    start = time.monotonic()
    build_env = base / "build-env"
    _run([sys.executable, "-m", "venv", build_env], elsewhere, 300)
    _run([build_env / "bin" / "python", "-m", "pip", "install", "-q", "-c", CONSTRAINTS, "build"], elsewhere, 600)
    # PIP_CONSTRAINT reaches the pip that installs hatchling into build's isolated environments.
    _run([build_env / "bin" / "python", "-m", "build", "--outdir", dist, ROOT], elsewhere, 600,
         PIP_CONSTRAINT=str(CONSTRAINTS))
    seconds["build"] = time.monotonic() - start
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert [p.name for p in wheels] == [f"torch_retrofit-{VERSION}-py3-none-any.whl"]
    assert [p.name for p in sdists] == [f"torch_retrofit-{VERSION}.tar.gz"]

    start = time.monotonic()
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", venv], elsewhere, 300)
    # --no-compile: no bytecode for the ~28,000 files of torch & co. up front (a third of the
    # install's CPU time); the checks compile what they import.
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", "-c", CONSTRAINTS, wheels[0]],
         elsewhere, 1800)
    seconds["install"] = time.monotonic() - start
    purelib = _run([venv / "bin" / "python", "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   elsewhere, 60).stdout.strip()
    print(f"\n{wheels[0].name}: {wheels[0].stat().st_size:,} bytes; {sdists[0].name}: {sdists[0].stat().st_size:,} "
          f"bytes; build {seconds['build']:.0f} s, venv + install {seconds['install']:.0f} s")
    yield Installed(wheels[0], sdists[0], venv, Path(purelib), elsewhere, seconds)
    for folder in (venv, build_env):
        shutil.rmtree(folder, ignore_errors=True)


def _metadata(text: str) -> email.message.Message:
    return email.parser.Parser().parsestr(text)


def _norm(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", requirement.lower())


def test_the_wheel_holds_the_package_its_rule_files_and_nothing_else(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as z:
        names = set(z.namelist())
        read = z.read
        assert {n.split("/")[0] for n in names} == {"retrofit", DIST_INFO}
        package = {n for n in names if n.startswith("retrofit/")}
        sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "retrofit").rglob("*.py")
                   if "__pycache__" not in p.parts}
        rules = {f"retrofit/rules/{p.name}": p for p in (ROOT / "rules").iterdir() if p.is_file()}
        assert package == sources | set(rules) | {"retrofit/py.typed"}
        assert len(rules) == 42 and "retrofit/rules/se.toml" in rules and "retrofit/rules/README.md" in rules
        assert "retrofit/rules/yolo-cbam-backbone.toml" in rules and "retrofit/rules/yolo-cbam-sppf.toml" in rules
        for name, path in rules.items():
            assert read(name) == path.read_bytes(), name
        assert read(f"{DIST_INFO}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        assert read(f"{DIST_INFO}/entry_points.txt").decode() == "[console_scripts]\nretrofit = retrofit.cli:main\n"
        meta = _metadata(read(f"{DIST_INFO}/METADATA").decode())
    assert (meta["Name"], meta["Version"], meta["License-Expression"]) == ("torch-retrofit", VERSION, "Apache-2.0")
    assert meta["Requires-Python"] == ">=3.11"
    assert sorted(meta.get_all("Provides-Extra")) == sorted(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requires = {_norm(r) for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    assert requires == {_norm(r) for r in project["dependencies"]}
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert meta.get_payload().startswith("# retrofit\n")  # the README is the long description


def test_the_sdist_holds_what_builds_and_tests_the_wheel(installed: Installed) -> None:
    prefix = f"torch_retrofit-{VERSION}/"
    with tarfile.open(installed.sdist) as t:
        files = {m.name.removeprefix(prefix) for m in t.getmembers() if m.isfile()}
    for must in ("PKG-INFO", "pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "constraints.txt",
                 "retrofit/__init__.py", "retrofit/hub.py", "retrofit/py.typed", "rules/se.toml",
                 "tests/test_wheel.py", "tests/hub_cache.py", "examples/finetune.py"):
        assert must in files, must
    assert not [f for f in files if f.startswith((".venv/", "runs/", "dist/")) or "__pycache__" in f]
    if (ROOT / ".git").exists():  # a clone: every tracked file of the included folders is in it
        # -z: tracked names may hold spaces (placement units are named after their sites)
        tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, text=True, cwd=ROOT,
                                 check=True).stdout.split("\0")
        included = ("retrofit/", "rules/", "tests/", "examples/", "scripts/", "benchmarks/", "docs/")
        want = {f for f in tracked if f.startswith(included)} | {"cli.py", "README.md", "CHANGELOG.md", "LICENSE",
                                                                   "CONTRIBUTING.md", "mkdocs.yml"}
        assert sorted(want - files) == []


def test_version(installed: Installed) -> None:
    r = installed.retrofit("--version")
    import timm
    import torch
    import torchvision

    assert r.stdout == (f"torch-retrofit {VERSION} from {installed.purelib / 'retrofit'} (torch {torch.__version__}, "
                        f"torchvision {torchvision.__version__}, timm {timm.__version__}; Python "
                        f"{sys.version.split()[0]})\n")
    assert r.stderr == ""  # no other `retrofit` distribution in a fresh environment


def test_list_reads_the_rule_files_inside_the_wheel(installed: Installed) -> None:
    got = json.loads(installed.retrofit("list", "--format", "json").stdout)
    assert got["rules"] == retrofit.list_builtin_rules()  # the same rule sets, the same descriptions
    assert sorted(got["attention"]) == sorted(retrofit.list_attention())


def test_retrofit_a_model(installed: Installed) -> None:
    r = installed.retrofit("resnet18", "--attn", "se", "--input-size", "64", "--format", "json")
    got = json.loads(r.stdout)
    want = retrofit.get_report(retrofit.retrofit(cached("resnet18"), "se", input_size=64)).to_dict()
    for key in ("params_before", "params_after", "flops_before", "flops_after", "sites_changed", "max_abs_diff",
                "sites"):
        assert got[key] == want[key], key
    assert (got["params_before"], got["params_added"], got["max_abs_diff"]) == (11689512, 90112, 0.0)


_IMPORT_ALL = """
import importlib, json, pkgutil, sys
from importlib import metadata
import retrofit
from retrofit.rulefile import builtin_rules_dir
modules = {}
for info in pkgutil.walk_packages(retrofit.__path__, "retrofit."):
    module = importlib.import_module(info.name)
    names = list(getattr(module, "__all__", []))
    for name in names:
        getattr(module, name)
    modules[info.name] = names
star = {}
exec("from retrofit import *", star)
dist = metadata.distribution("torch-retrofit")
print(json.dumps({
    "modules": modules, "star": sorted(k for k in star if k != "__builtins__"),
    "file": retrofit.__file__, "rules": str(builtin_rules_dir()), "version": retrofit.__version__,
    "dist": [dist.metadata["Name"], dist.version], "path": sys.path,
    "files": sorted(str(f) for f in dist.files), "direct_url": dist.read_text("direct_url.json"),
}))
"""


def test_every_public_name_imports_from_the_installed_package(installed: Installed) -> None:
    got = json.loads(installed.python(_IMPORT_ALL).stdout)
    want = {}
    for info in pkgutil.walk_packages(retrofit.__path__, "retrofit."):
        want[info.name] = list(getattr(importlib.import_module(info.name), "__all__", []))
    assert got["modules"] == want  # every module of the source is in the wheel, with the same public names
    assert "retrofit.hub" in got["modules"] and "retrofit.cli" in got["modules"]
    assert got["star"] == sorted(retrofit.__all__)
    site = str(installed.purelib)
    assert got["file"] == f"{site}/retrofit/__init__.py"
    assert got["rules"] == f"{site}/retrofit/rules"  # the rule files inside the installed wheel
    assert got["version"] == VERSION and got["dist"] == ["torch-retrofit", VERSION]
    assert not [p for p in got["path"] if p.startswith(str(ROOT))]  # nothing from the source tree
    assert "retrofit/py.typed" in got["files"] and "retrofit/rules/se.toml" in got["files"]
    assert got["direct_url"] is not None and '"editable": true' not in got["direct_url"]  # installed from a file


_HUB = """
import importlib.util, sys, torch, retrofit
from retrofit.publish import save_for_hub
spec = importlib.util.spec_from_file_location("hub_cache", sys.argv[1])
hub_cache = importlib.util.module_from_spec(spec); spec.loader.exec_module(hub_cache)
torch.manual_seed(0)
gm = retrofit.retrofit(retrofit.create_model("resnet18", num_classes=3), "eca", input_size=64).eval()
folder = save_for_hub(gm, sys.argv[2] + "/up", "me/x")
hub_cache.lay_out_folder(sys.argv[3], "me/x", folder)
x = torch.randn(1, 3, 64, 64)
print(torch.equal(gm(x), retrofit.load("hf-hub:me/x").eval()(x)))
"""


def test_a_hub_save_round_trips_offline(installed: Installed) -> None:
    """huggingface_hub is a declared dependency: the Hub path works from the wheel alone."""
    cache = installed.elsewhere / "hf-cache"
    r = installed.python(_HUB, str(ROOT / "tests" / "hub_cache.py"), str(installed.elsewhere), str(cache),
                         HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert r.stdout == "True\n"
