"""Bad input on the command line (issue 27): each case exits 2 with one line that says what
and how to fix it, never 3 ("this is a bug"), and nothing is built, loaded or written
first; text read from files is escaped before it reaches the terminal; an ``hf-hub:`` save
without a network answers at once; Python's warnings in ``retrofit gates`` are one line each.

Each test runs ``retrofit.cli.main`` in this process (``run_cli``), with canaries that fail
the test if the model would be built or loaded; the offline Hub case runs the console script,
since what it checks (time, every line on stderr) is the process's.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

import retrofit
import retrofit.build
import retrofit.models
import retrofit.scoring
from retrofit import RuleError
from retrofit.publish import save_for_hub
from retrofit.rulefile import load_rules

from .conftest import run_cli as run
from .finetune_helpers import NARROW, one_thread  # noqa: F401
from .hub_cache import lay_out_folder

ESC = "\x1b[2J"  # "clear the screen", as a file can carry it
SHOWN = "\\x1b[2J"  # what the terminal must get instead


def one_line(r: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2, one line on stderr starting with ``message`` (a literal), no traceback, nothing on stdout."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == "", r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(message), r.stderr


@pytest.fixture
def nothing_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Canary: building a model or loading a save fails the test (the command must stop first)."""
    def ran(*args: object, **kwargs: object) -> None:
        pytest.fail("the command built or loaded a model before refusing its arguments")

    monkeypatch.setattr(retrofit.models, "create_model", ran)
    monkeypatch.setattr(retrofit.build, "load", ran)


@pytest.fixture(scope="module")
def narrow() -> torch.nn.Module:
    """A small retrofitted resnet18 (3 channels, 4 classes) that carries its recipe."""
    torch.manual_seed(0)
    base = retrofit.create_model("resnet18", **{**NARROW, "in_chans": 3, "num_classes": 4})
    return retrofit.retrofit(base, "se", input_size=(3, 32, 32), verify=False)


# --------------------------------------------------------------------------- sizes


@pytest.mark.usefixtures("nothing_runs")
@pytest.mark.parametrize("size", ["100000", "224x100000", "4097x32x32"])
def test_an_input_size_too_large_is_refused_before_anything_is_built(size: str) -> None:
    one_line(run("resnet18", "--input-size", size),
             f"retrofit: error: argument --input-size: '{size}' is too large: at most 8192 pixels a side and 4096 "
             "channels (see retrofit --help)")


@pytest.mark.usefixtures("nothing_runs")
def test_a_class_count_too_large_is_refused_before_anything_is_built() -> None:
    one_line(run("resnet18", "--num-classes", "10000000000"),
             "retrofit: error: argument --num-classes: '10000000000' is too many classes: at most 1,000,000 "
             "(see retrofit --help)")


def test_the_limits_are_in_the_help() -> None:
    r = run("--help")
    assert r.returncode == 0
    help_text = " ".join(r.stdout.split())
    assert "at most 8192 a side, 4096 channels" in help_text and "at most 1,000,000" in help_text


# --------------------------------------------------------------------------- rule files


def test_a_rule_file_that_is_not_utf8(tmp_path: Path) -> None:
    rules = tmp_path / "latin1.toml"
    rules.write_bytes('# Größe\n[[rule]]\nat = "residual-add"\nattn = "se"\n'.encode("latin-1"))
    with pytest.raises(RuleError, match=rf"^{re.escape(str(rules))}: not UTF-8 text \(byte 0xf6 at offset 4\)"):
        load_rules(rules)
    one_line(run("resnet18", "--input-size", "32", "--rules", str(rules), "--dry-run"),
             f"retrofit: error: {rules}: not UTF-8 text (byte 0xf6 at offset 4); a rule file is TOML, which is UTF-8")


def test_a_rule_file_nested_too_deeply(tmp_path: Path) -> None:
    rules = tmp_path / "deep.toml"
    rules.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    one_line(run("resnet18", "--input-size", "32", "--rules", str(rules), "--dry-run"),
             f"retrofit: error: {rules}: arrays or tables nested too deeply to read")


def test_a_rule_file_that_never_ends(tmp_path: Path) -> None:
    """/dev/zero is not a regular file (refused unread, as every file from others is); a huge
    file is read up to the cap, not until memory runs out."""
    with pytest.raises(RuleError, match=r"^cannot read rule file '/dev/zero': not a regular file \(a character "
                                        r"device"):
        load_rules("/dev/zero")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(RuleError, match=r"big.toml: longer than 1 MiB; not a rule file"):
        load_rules(big)


# --------------------------------------------------------------------------- --out names


def test_an_empty_out_name_is_refused(tmp_path: Path, nothing_runs: None) -> None:
    one_line(run("resnet18", "--input-size", "32", "--out", "", cwd=tmp_path),
             "retrofit: error: --out '': the name is empty; give the name of the file to write")
    assert list(tmp_path.iterdir()) == []  # nothing saved, nothing left behind


def test_an_out_name_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path: Path,
                                                                            nothing_runs: None) -> None:
    """A name of bytes that are not UTF-8 reaches sys.argv as lone surrogates ('\\udcff' for
    byte 0xff); safetensors could not open such a save again, so none is written."""
    name = str(tmp_path) + "/m\udcff.safetensors"  # what sys.argv holds for b".../m\xff.safetensors"
    one_line(run("resnet18", "--input-size", "32", "--out", name),
             f"retrofit: error: --out '{tmp_path}/m\\xff.safetensors': the name is not UTF-8 (byte 0xff); a save "
             "under it could not be read back (safetensors opens UTF-8 names only). Nothing was written")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- --score-data


def test_score_data_without_class_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrofit.scoring, "score_sites", lambda *a, **k: pytest.fail("scored"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    one_line(run("resnet18", "--input-size", "32", "--score-data", str(tmp_path / "flat")),
             f"retrofit: error: {tmp_path / 'flat'} is not an ImageFolder: Couldn't find any class folder in "
             f"{tmp_path / 'flat'}")


# --------------------------------------------------------------------------- gates arguments


@pytest.mark.usefixtures("nothing_runs")
@pytest.mark.parametrize("option,value", [("--batch-size", "0"), ("--samples", "-1"), ("--samples", "many")])
def test_gates_counts_must_be_at_least_one(tmp_path: Path, option: str, value: str) -> None:
    one_line(run("gates", "x.pt", "--data", str(tmp_path), option, value, "--out", str(tmp_path / "g.png")),
             f"retrofit gates: error: argument {option}: '{value}' is not a count; use an integer >= 1 "
             "(see retrofit gates --help)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("nothing_runs")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_gates_on_a_cuda_device_this_machine_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   device: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, whatever this one is
    one_line(run("gates", "x.pt", "--data", str(tmp_path), "--device", device),
             f"retrofit gates: error: --device '{device}': no CUDA device is available here "
             "(torch.cuda.is_available() is False); use --device cpu")


@pytest.mark.usefixtures("nothing_runs")
def test_gates_on_a_cuda_index_past_the_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one_line(run("gates", "x.pt", "--data", str(tmp_path), "--device", "cuda:3"),
             "retrofit gates: error: --device 'cuda:3': this machine has 1 CUDA device (cuda:0 to cuda:0)")


@pytest.mark.usefixtures("nothing_runs")
def test_gates_empty_out_name(tmp_path: Path) -> None:
    one_line(run("gates", "x.pt", "--data", str(tmp_path), "--out", ""),
             "retrofit gates: error: --out '': the name is empty")


# --------------------------------------------------------------------------- escaped text


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for k in range(2):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (60 * i, 90 * k, 30)).save(root / f"class{k}" / f"{i}.png")
    return root


def test_gates_warnings_are_one_escaped_line_each(tmp_path: Path, narrow: torch.nn.Module,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A save whose header records other package versions warns; the versions are the file's
    text: one `warning:` line, not Python's two-line form, with the escape sequence escaped."""
    folder = retrofit.save(narrow, tmp_path / "save")
    header = json.loads((folder / "recipe.json").read_text())
    header["versions"]["torch"] = f"0.0.1{ESC}"
    (folder / "recipe.json").write_text(json.dumps(header))
    data = _image_folder(tmp_path / "data")
    r = run("gates", str(folder), "--data", str(data), "--samples", "4", "--batch-size", "4", "--device", "cpu",
            "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        f"warning: {folder} was saved with other package versions (torch 0.0.1{SHOWN} -> {torch.__version__})"]
    assert "\x1b" not in r.stdout + r.stderr


def test_diff_escapes_tensor_names_from_the_files(tmp_path: Path, narrow: torch.nn.Module) -> None:
    folder = retrofit.save(narrow, tmp_path / "save")
    weights = folder / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    tensors = load_file(weights)
    tensors[f"{ESC}evil\u202e.weight"] = torch.zeros(3)
    save_file(tensors, weights, metadata=meta)
    r = run("diff", str(folder), str(folder))
    assert r.returncode == 0, r.stderr
    assert re.search(rf"^{re.escape(SHOWN)}evil\\u202e +3 +3 +0$", r.stdout, re.M), r.stdout
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout
    r = run("diff", str(folder), str(folder), "--format", "json")  # JSON escapes them itself
    assert r.returncode == 0 and "\x1b" not in r.stdout, r.stderr
    assert {"module": f"{ESC}evil\u202e", "a": 3, "b": 3, "delta": 0} in json.loads(r.stdout)["rows"]


def test_error_lines_escape_text_from_files(tmp_path: Path, narrow: torch.nn.Module,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub save's recipe names its model file; offline and not in the cache, the error
    line quotes that name. The one-line printer escapes it (and any other message)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = save_for_hub(narrow, tmp_path / "up", "me/x")
    header = json.loads((folder / "recipe.json").read_text())
    header["recipe"]["model"] = f"{ESC}net.py:build"
    (folder / "recipe.json").write_text(json.dumps(header))
    lay_out_folder(cache, "me/x", folder)
    r = run("diff", "hf-hub:me/x", "hf-hub:me/x")
    one_line(r, f"retrofit diff: error: hf-hub:me/x: {SHOWN}net.py is not in the Hugging Face cache")
    assert "\x1b" not in r.stderr

    import retrofit.cli as cli

    def hostile(argv: list[str]) -> int:
        raise RuleError(f"rule {ESC}\r\x9b2J\u2028name is invalid")

    monkeypatch.setitem(cli._COMMANDS, "list", hostile)
    one_line(run("list"), "retrofit list: error: rule \\x1b[2J\\r\\x9b2J\\u2028name is invalid")


# --------------------------------------------------------------------------- hf-hub: offline


def test_a_cached_hub_save_loads_at_once_when_the_hub_is_unreachable(tmp_path: Path, narrow: torch.nn.Module,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE unset and no network (the Hub's address is a closed local port): the
    probe fails, the cache alone is asked, and it holds the snapshot."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "*")
    lay_out_folder(cache, "me/x", save_for_hub(narrow, tmp_path / "up", "me/x"))
    start = time.perf_counter()
    r = run("diff", "hf-hub:me/x", "hf-hub:me/x", "--format", "json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert time.perf_counter() - start < 10
    assert json.loads(r.stdout)["rows"][-1]["delta"] == 0
    r = run("diff", "hf-hub:me/missing", "hf-hub:me/x")
    one_line(r, f"retrofit diff: error: hf-hub:me/missing: recipe.json is not in the Hugging Face cache ({cache}) "
                "and there is no network (cannot reach 127.0.0.1:9: Connection refused); load it once with the "
                "network, or point HF_HUB_CACHE at a cache that holds it")


def test_an_uncached_hub_save_offline_is_one_line_and_fast(tmp_path: Path) -> None:
    """The console script, HF_HUB_OFFLINE unset, the Hub's address a closed port, an empty
    cache: before, 11 lines of huggingface_hub retries and ~26 s; now one line."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "",
           "HF_ENDPOINT": "http://127.0.0.1:9", "NO_PROXY": "*", "no_proxy": "*"}
    start = time.perf_counter()
    r = run("diff", "hf-hub:me/missing", "hf-hub:me/other", env=env, cwd=tmp_path)
    elapsed = time.perf_counter() - start
    one_line(r, f"retrofit diff: error: hf-hub:me/missing: recipe.json is not in the Hugging Face cache "
                f"({tmp_path / 'hf' / 'hub'}) and there is no network (cannot reach 127.0.0.1:9: Connection refused)")
    assert elapsed < 20, elapsed  # imports included; the retries alone slept 23 s


def test_huggingface_hub_retry_warnings_are_not_printed(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """What huggingface_hub logs before each retry (a warning on its logger) is off while a
    Hub save is fetched; its errors are not, and the level is restored after."""
    import logging

    from retrofit.download import hf_quiet

    monkeypatch.delenv("HF_HUB_VERBOSITY", raising=False)
    logger = logging.getLogger("huggingface_hub.utils._http")
    root = logging.getLogger("huggingface_hub")
    before = root.level
    handler = logging.StreamHandler()  # stderr, as huggingface_hub's own handler
    root.addHandler(handler)
    try:
        with hf_quiet():
            logger.warning("Retrying in 1s [Retry 1/5].")
            logger.error("the last try failed")
    finally:
        root.removeHandler(handler)
    assert capsys.readouterr().err == "the last try failed\n"
    assert root.level == before
