"""The command line: ``retrofit.cli.main`` in this process for what it prints and returns,
and the installed console script in a subprocess for what only a process shows (exit
status, streams, pipes, a terminal, the environment, the entry points).

Starting a process costs ~6 s of imports (torch, timm, torchvision); most tests check output
and exit codes, which ``main`` decides alone (it returns the code the script exits with), so
they run in this process. ``test_in_process_runs_match_the_console_script`` keeps the two
ways equal.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import retrofit

from .conftest import SCRIPT, cached
from .conftest import run_cli as run

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("args", [
    ["resnet18", "--attn", "cbam", "--input-size", "64", "--sites"],
    ["resnet18", "--attn", "cbm"],
    ["resnet18", "--input-size", "big"],
], ids=["table", "library-error", "usage-error"])
def test_in_process_runs_match_the_console_script(args: list[str]) -> None:
    here, there = run(*args), run(*args, process=True)
    assert (here.returncode, here.stdout, here.stderr) == (there.returncode, there.stdout, there.stderr)


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
        (["resnet18", "--checkpoint", "nothing.pt"], r"retrofit: error: checkpoint 'nothing.pt' not found"),
        (["resnet18", "--attn", "se", "--out", "README.md"],
         r"retrofit: error: 'README.md' exists; not overwriting it \(pass --force to replace it\)"),
        (["resnet18", "--input-size", "64", "--out", "/nonexistent/dir/m.safetensors"],
         r"retrofit: error: cannot write '/nonexistent/dir/m.safetensors': folder '/nonexistent/dir' does not exist"),
        (["resnet18", "--input-size", "32", "--out", "/proc/m.safetensors"],  # safetensors' own I/O error
         r"retrofit: error: cannot write '/proc/m.safetensors': No such file or directory; check that its folder is writable"),
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


def one_line(r: subprocess.CompletedProcess[str], code: int, message: str) -> None:
    """The exit-code contract: ``code``, one line on stderr matching ``message``, no
    traceback, nothing on stdout."""
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert re.match(message, r.stderr), r.stderr
    assert r.stdout == ""


FACTORIES = (
    "import torch.nn as nn\n"
    "def broken():\n"
    "    raise RuntimeError('no such layer size')\n"
    "def build():\n"
    "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())\n"
)


def test_model_file_errors(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text(FACTORIES)
    one_line(run(f"{tmp_path / 'm.py'}:broken", "--input-size", "16"), 2,
             rf"retrofit: error: {re.escape(str(tmp_path / 'm.py'))}:broken failed: RuntimeError: no such layer "
             r"size; the error is in the factory's code in '.*m\.py'$")
    one_line(run(f"{tmp_path / 'm.py'}:build", "--num-classes", "3"), 2,
             r"retrofit: error: .*m\.py:build takes no argument 'num_classes' \(from --num-classes\); its "
             r"parameters: none\. Add a num_classes parameter to the factory, or leave the option out$")


def test_unreadable_safetensors_checkpoints(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.safetensors").write_text("not weights at all\n")
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickled.safetensors")
    for name, why in (("cut", "incomplete metadata, file not fully covered"),
                      ("text", "header too large"),
                      ("pickled", "header too large; it is a torch.save file: name it .pt to read it that way")):
        one_line(run("resnet18", "--checkpoint", str(tmp_path / f"{name}.safetensors"), "--input-size", "32"), 2,
                 rf"retrofit: error: cannot read checkpoint '.*{name}\.safetensors' \(corrupted or not a "
                 rf"checkpoint\): Error while deserializing header: {re.escape(why)}$")


def test_pretrained_without_network_is_fast_quiet_and_leaves_stdout_alone(tmp_path: Path) -> None:
    """No network, forced whatever the machine has: the Hub's address is a closed local port
    (timm), or the proxy torch.hub goes through is (torchvision); empty caches. Offline this
    took 50 s of retries with 23 lines of warnings, and torchvision wrote "Downloading" to stdout."""
    import time

    offline = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": ""}
    timm_env = {**offline, "HF_ENDPOINT": "http://127.0.0.1:9", "NO_PROXY": "*", "no_proxy": "*"}
    tv_env = {**offline, "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "NO_PROXY": "", "no_proxy": ""}
    for args, env, message in (
        (["resnet18", "--pretrained", "-q", "--format", "json"], timm_env,
         r"retrofit: error: cannot download pretrained weights for 'resnet18': no network \(cannot reach "
         r"127\.0\.0\.1:9: Connection refused\) and they are not in the Hugging Face cache; connect to the "
         r"network, or drop --pretrained and load weights with --checkpoint$"),
        (["torchvision:resnet18", "--pretrained", "--format", "json"], tv_env,
         r"retrofit: error: cannot download pretrained weights for torchvision:resnet18: no network \(cannot "
         r"reach download\.pytorch\.org:443 through the proxy 127\.0\.0\.1:9: Connection refused\) and they "
         r"are not in torch\.hub's cache; connect to the network, or drop --pretrained and load weights with "
         r"--checkpoint$"),
    ):
        start = time.perf_counter()
        r = run(*args, env=env)
        elapsed = time.perf_counter() - start
        one_line(r, 2, message)
        assert elapsed < 30, elapsed  # imports included; the retries alone took 50 s
    assert not list((tmp_path / "torch").rglob("*.pth"))


def test_input_size_that_does_not_fit_is_one_line() -> None:
    one_line(run("resnet18", "--input-size", "1x8x8"), 2,
             r"retrofit: error: shape propagation failed at node 'conv1' \(call_module conv1\): Given groups=1, "
             r"weight of size \[64, 3, 7, 7\], expected input\[2, 1, 8, 8\] to have 3 channels, but got 1 channels "
             r"instead\. Check the input size \(input_size=\.\.\., CLI --input-size: 224, 224x224 or 3x224x224\)$")


def test_arguments_that_used_to_pass_silently() -> None:
    one_line(run("resnet18", "--num-classes", "-1"), 2,
             r"retrofit: error: argument --num-classes: '-1' is not a class count; use an integer >= 1 "
             r"\(0: no classifier\) \(see retrofit --help\)$")
    one_line(run("resnet18", "--input-size", "32", "--leaf-module", "basicblock"), 2,
             r"retrofit: error: leaf module 'basicblock' matches nothing in ResNet; did you mean 'BasicBlock'\? "
             r"\(give a module path such as 'conv1', 'fc', or the class name of a module in it: .*\)$")
    one_line(run("resnet18", "--input-size", "32", "--leaf-module", "NoSuchThing"), 2,
             r"retrofit: error: leaf module 'NoSuchThing' matches nothing in ResNet \(give a module path")
    r = run("resnet18", "--input-size", "32", "--leaf-module", "layer4.1", "--leaf-module", "BasicBlock", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_attention_argument_errors_name_the_rule(tmp_path: Path) -> None:
    (tmp_path / "zero.toml").write_text('[[rule]]\nat = "residual-add"\nattn = "se"\nargs = { rd_ratio = 0 }\n')
    one_line(run("resnet18", "--input-size", "32", "--rules", str(tmp_path / "zero.toml")), 2,
             r"retrofit: error: .*zero\.toml, rule 1: se: rd_ratio = 0 is not valid: it is the bottleneck width as "
             r"a fraction of the channels, a number > 0 \(e\.g\. 0\.0625 for 1/16\); or give the width itself as "
             r"rd_channels$")
    (tmp_path / "neg.toml").write_text('[[rule]]\nat = "residual-add"\nattn = "gc"\nargs = { rd_ratio = -0.25 }\n')
    one_line(run("resnet18", "--input-size", "32", "--rules", str(tmp_path / "neg.toml"), "--dry-run"), 2,
             r"retrofit: error: .*neg\.toml, rule 1: gc: rd_ratio = -0\.25 is not valid")
    (tmp_path / "even.toml").write_text('[[rule]]\nat = "residual-add"\nattn = "eca"\ninclude = ["layer4.*"]\n\n'
                                        '[[rule]]\nat = "residual-add"\nattn = "cbam"\ninclude = ["layer3.*"]\n'
                                        'args = { spatial_kernel_size = 4 }\n')
    one_line(run("resnet18", "--input-size", "32", "--rules", str(tmp_path / "even.toml")), 2,
             r"retrofit: error: .*even\.toml, rule 2: cbam: spatial_kernel_size = 4 is not valid: an odd integer "
             r">= 1, so the spatial gate keeps the map's size \(building 'cbam' for site 'layer3\.0', 256 channels\)$")
    one_line(run("resnet18", "--input-size", "32", "--attn", "nonlocal", "--gate", "sigmoid"), 2,
             r"retrofit: error: built-in 'nonlocal', rule 1: attention 'nonlocal' has no sigmoid gate")


def test_internal_errors_exit_3_and_say_it_is_a_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception retrofit did not raise on purpose: one line, exit 3; --debug adds the traceback."""
    import retrofit.cli as cli

    def broken(argv: list[str]) -> int:
        return {}["no such key"]

    monkeypatch.setitem(cli._COMMANDS, "list", broken)
    one_line(run("list"), 3, r"retrofit list: internal error: KeyError: 'no such key' -- this is a bug in retrofit; "
                             r"rerun with --debug for the traceback and report it$")
    r = run("list", "--debug")
    assert r.returncode == 3 and r.stderr.startswith("Traceback") and "KeyError: 'no such key'" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("retrofit list: internal error: KeyError")


@pytest.mark.parametrize("args", [["list"], ["resnet18", "--input-size", "32", "--dry-run"]])
def test_a_reader_that_goes_away_ends_quietly(args: list[str]) -> None:
    """`retrofit ... | head`: the reader closes the pipe; no BrokenPipeError traceback, the
    exit status of a program stopped by SIGPIPE (128 + 13)."""
    p = subprocess.Popen([SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    p.stdout.close()  # before the first line is written: every write fails
    _, err = p.communicate(timeout=300)
    assert p.returncode == 141 and err == "", err


def test_warnings_print_once(tmp_path: Path) -> None:
    (tmp_path / "glob.toml").write_text('[[rule]]\nat = "residual-add"\nattn = "se"\ninclude = ["layer4.*", "nope*"]\n')
    want = (f"warning: {tmp_path / 'glob.toml'}, rule 1: include glob 'nope*' matches no residual-add site (paths look "
            "like 'layer1.0', 'layer4.1')")
    r = run("resnet18", "--input-size", "32", "--rules", str(tmp_path / "glob.toml"), process=True)
    assert r.returncode == 0 and r.stderr.splitlines() == [want], r.stderr
    r = run("resnet18", "--input-size", "32", "--rules", str(tmp_path / "glob.toml"), "--format", "json")
    assert r.returncode == 0 and r.stderr == "", r.stderr  # the warning is in the JSON
    assert json.loads(r.stdout)["warnings"] == [want.removeprefix("warning: ")]
    (tmp_path / "none.toml").write_text('[[rule]]\nat = "residual-add"\nattn = "se"\ninclude = ["layer9.*"]\n')
    r = run("resnet18", "--input-size", "32", "--rules", str(tmp_path / "none.toml"), "-q", "--allow-empty")
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""
    r = run("resnet18", "--input-size", "32", "--rules", str(tmp_path / "none.toml"), "--format", "json",
            "--allow-empty")
    assert r.stderr.splitlines() == ["warning: rules '" + str(tmp_path / "none.toml") + "' selected no site of "
                                     "ResNet; nothing inserted"], r.stderr


def test_gates_command_follows_the_contract(tmp_path: Path) -> None:
    one_line(run("gates", str(tmp_path / "missing.pt"), "--data", str(tmp_path)), 2, r"retrofit gates: error: ")
    one_line(run("gates", "x.pt"), 2, r"retrofit gates: error: the following arguments are required: --data "
                                     r"\(see retrofit gates --help\)$")


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
    # every type's constraints: one sentence, or none
    assert listing["constraints"].keys() == listing["attention"].keys()
    assert listing["constraints"]["se"] is None
    assert listing["constraints"]["ema"] == "channels divisible by factor (32 by default)"
    r = run("list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    assert "se                           Squeeze-and-Excitation: global average pool, a two-layer bottleneck, a" in lines
    assert set(retrofit.list_attention()) <= {line.split(" ", 1)[0] for line in lines}
    constrained = lines.index(next(line for line in lines if line.startswith("attention    constraints")))
    assert "sge          channels divisible by groups (64 by default)" in lines[constrained:]


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


def test_python_dash_m_runs_the_command_line_and_importing_it_runs_nothing() -> None:
    r = subprocess.run([sys.executable, "-m", "retrofit", "--version"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("torch-retrofit "), r.stderr
    r = subprocess.run([sys.executable, "-c", "import retrofit.__main__; print('imported')"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout == "imported\n", r.stderr


def test_rules_that_select_nothing_are_an_error_unless_allowed() -> None:
    """A rule set for another kind of model (YOLO's blocks on a ResNet) inserts nothing: that
    is a mistake, said in one line, unless --allow-empty says it is expected."""
    one_line(run("resnet18", "--input-size", "32", "--attn", "yolo-cbam-backbone"), 2,
             r"retrofit: error: rules 'yolo-cbam-backbone' selected no site of ResNet \(\d+ sites found, \d+ left "
             r"alone.*\); nothing was inserted\..*pass --allow-empty to accept it$")
    r = run("resnet18", "--input-size", "32", "--attn", "yolo-cbam-backbone", "--allow-empty", "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["sites_changed"] == 0


def test_attention_names_ignore_case_where_unambiguous() -> None:
    r = run("resnet18", "--input-size", "32", "--attn", "SE", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert {s["attn"] for s in json.loads(r.stdout)["sites"]} == {"se"}
    assert retrofit.rulefile.resolve_rules("CBAM").name == retrofit.rulefile.resolve_rules("cbam").name


def test_help_lists_every_command() -> None:
    r = run("--help")
    assert r.returncode == 0
    listed = re.findall(r"^  retrofit (\w+)", r.stdout, flags=re.M)
    assert {"MODEL", "list", "diff", "gates", "COMMAND"} <= set(listed), r.stdout
    assert "--allow-empty" in r.stdout and "--verbose" in r.stdout


def test_colour_codes_of_other_libraries_are_removed_and_file_text_escaped() -> None:
    from retrofit.text import printable

    # torch's weights_only error, as it reaches an error line
    assert printable("\x1b[1mWeightsUnpickler error: \x1b[0mUnsupported global") == \
        "WeightsUnpickler error: Unsupported global"
    assert printable("layer\x1b[2J\x1b[31m.weight\nnext") == "layer\\x1b[2J.weight\\nnext"
