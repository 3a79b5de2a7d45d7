"""The console script, run for real in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retrofit

from .conftest import cached

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = shutil.which("retrofit", path=str(Path(sys.executable).parent))


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=full_env)


def test_console_script_is_installed() -> None:
    assert SCRIPT is not None, "pip install -e . installs the `retrofit` console script"


def test_table_output() -> None:
    r = run("resnet18", "--attn", "cbam", "--input-size", "64", "--sites")
    assert r.returncode == 0, r.stderr
    assert re.search(r"parameters before +11,689,512", r.stdout)
    assert re.search(r"FLOPs before +0\.297 G", r.stdout)
    assert re.search(r"sites changed / skipped / found +8 / 0 / 28", r.stdout)
    assert re.search(r"layer3 +2,099,712 +2,116,294 +16,582 +\+0\.79%", r.stdout)  # per-stage rows
    assert "0 (exact identity)" in r.stdout
    assert "layer4.1.cbam" in r.stdout
    assert r.stderr == ""  # no progress lines when stderr is not a terminal


def test_json_matches_python_api() -> None:
    r = run("resnet18", "--attn", "se", "--input-size", "64", "--format", "json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = retrofit.get_report(retrofit.retrofit(cached("resnet18"), "se", input_size=64)).to_dict()
    for key in ("params_before", "params_after", "flops_before", "flops_after", "sites_changed", "max_abs_diff"):
        assert got[key] == want[key], key
    assert [s["module"] for s in got["sites"]] == [s["module"] for s in want["sites"]]


def test_checkout_entry_point() -> None:
    r = subprocess.run([sys.executable, "cli.py", "resnet18", "--attn", "eca", "--input-size", "64"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "exact identity" in r.stdout


def test_torchvision_and_file_models(tmp_path: Path) -> None:
    r = run("torchvision:resnet18", "--input-size", "64")
    assert r.returncode == 0, r.stderr
    (tmp_path / "mine.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU())\n"
    )
    r = run(f"{tmp_path / 'mine.py'}:build", "--input-size", "16", "--attn", "eca", "--sites")
    assert r.returncode == 0, r.stderr
    assert "0_eca" in r.stdout and "2_eca" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["resnet5O"], r"retrofit: error: unknown timm model 'resnet5O'; closest: resnet50"),
        (["resnet18", "--attn", "cbm"], r"retrofit: error: unknown attention rule set 'cbm'; did you mean 'cbam'\?"),
        (["torchvision:resnet5"], r"retrofit: error: unknown torchvision model 'resnet5'; closest: resnet50"),
        (["nofile.py:build"], r"retrofit: error: model file 'nofile.py' not found"),
        (["resnet18", "--rules", "missing.toml"], r"retrofit: error: cannot read rule file 'missing.toml'"),
        (["torchvision:resnet18", "--pretrained"],
         r"retrofit: error: cannot download pretrained weights for torchvision:resnet18 \(URLError: .*\); check the network"),
        (["resnet18", "--checkpoint", "nothing.pt"], r"retrofit: error: checkpoint 'nothing.pt' not found"),
        (["resnet18", "--attn", "se", "--out", "README.md"],
         r"retrofit: error: 'README.md' exists; not overwriting it \(pass --force to replace it\)"),
        (["resnet18", "--input-size", "64", "--out", "/nonexistent/dir/m.safetensors"],
         r"retrofit: error: cannot write '/nonexistent/dir/m.safetensors': folder '/nonexistent/dir' does not exist"),
        (["resnet18", "--bogus"], r"retrofit: error: unrecognized arguments: --bogus \(see retrofit --help\)"),
        (["diff", "a.safetensors"], r"retrofit diff: error: the following arguments are required: b"),
    ],
)
def test_user_errors_are_one_line_exit_2(args: list[str], message: str) -> None:
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert re.match(message, lines[0]), lines[0]


def test_bad_input_size_is_usage_error() -> None:
    r = run("resnet18", "--input-size", "big")
    assert r.returncode == 2
    assert "'big' is not a size; use 224, 224x224 or 3x224x224" in r.stderr


def test_sigmoid_gate_exits_zero_and_says_outputs_change() -> None:
    r = run("resnet18", "--gate", "sigmoid", "--input-size", "64")
    assert r.returncode == 0, r.stderr
    assert "sigmoid gates change outputs" in r.stdout


def test_identity_failure_exits_1(tmp_path: Path) -> None:
    """A model whose forward is not deterministic cannot pass the identity check."""
    (tmp_path / "noisy.py").write_text(
        "import torch, torch.nn as nn\n"
        "class Noisy(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x) + torch.rand(1)\n"
        "def build():\n"
        "    return Noisy()\n"
    )
    r = run(f"{tmp_path / 'noisy.py'}:build", "--input-size", "8")
    assert r.returncode == 1, r.stderr
    assert "NOT identity" in r.stdout
    assert torch.rand(1).shape == (1,)


def test_debug_shows_traceback() -> None:
    r = run("resnet5O", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_timm_pretrained_offline_is_one_line() -> None:
    r = run("resnet18", "--pretrained", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("retrofit: error: cannot download pretrained weights for 'resnet18' (")
    assert "drop --pretrained and load weights with --checkpoint" in r.stderr


def test_checkpoint_dry_run_out_load_diff(tmp_path: Path) -> None:
    model = cached("resnet18")
    torch.save(model.state_dict(), tmp_path / "base.pth")
    r = run("resnet18", "--checkpoint", str(tmp_path / "base.pth"), "--input-size", "64", "--attn", "se",
            "--dry-run", "--out", str(tmp_path / "x.safetensors"))
    assert r.returncode == 0, r.stderr
    assert "se (branch)" in r.stdout and "layer4.1" in r.stdout
    assert not (tmp_path / "x.safetensors").exists()  # a dry run writes nothing
    for attn, out in (("se", "se.safetensors"), ("eca", "eca_dir")):
        r = run("resnet18", "--checkpoint", str(tmp_path / "base.pth"), "--input-size", "64", "--attn", attn,
                "--out", str(tmp_path / out), "-q")
        assert r.returncode == 0 and r.stdout == "", r.stderr
    gm = retrofit.load(tmp_path / "se.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), model.eval()(x))  # identity at init, the checkpoint's weights
    r = run("diff", str(tmp_path / "se.safetensors"), str(tmp_path / "eca_dir"))
    assert r.returncode == 0, r.stderr
    assert re.search(r"total +11,779,624 +11,689,548 +-90,076", r.stdout), r.stdout
    r = run("resnet18", "--checkpoint", str(tmp_path / "se.safetensors"))
    assert r.returncode == 2 and "is it an already retrofitted model? load those with retrofit.load()" in r.stderr


def test_list_command() -> None:
    r = run("list", "--format", "json")
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert {"se", "eca", "cbam"} <= set(listing["attention"])
    assert {"se", "eca", "cbam", "se-mid", "cbam-conv"} <= set(listing["rules"])
    assert listing["attention"]["se"].startswith("Squeeze-and-Excitation")


def _stderr_on_a_terminal(*args: str) -> str:
    import pty

    master, slave = pty.openpty()
    try:
        r = subprocess.run([SCRIPT, *args], stdout=subprocess.PIPE, stderr=slave, cwd=ROOT, timeout=300)
        assert r.returncode == 0
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode()
    finally:
        os.close(master)


def test_progress_only_on_a_terminal_and_not_quiet() -> None:
    text = _stderr_on_a_terminal("resnet18", "--input-size", "64", "--attn", "eca")
    assert "building resnet18" in text and "tracing, inserting attention, checking identity" in text
    assert _stderr_on_a_terminal("resnet18", "--input-size", "64", "--attn", "eca", "-q") == ""
