"""Reading saves and checkpoints from others (issue 27): trusted code runs from the bytes
that were hashed, only regular files are read and only up to a cap, a recipe is compared
with the weights' header before anything is allocated, and every bad input is a
RetrofitError (the CLI's exit 2, one line), never an internal error, a hang or gigabytes.

Each case crafts a save or checkpoint from a valid one, as an attacker or a damaged disk
would; where code could run, a canary file proves it did not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import py_compile
import re
import shutil
import subprocess
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from safetensors.torch import save_model
from torch import nn

import retrofit
from retrofit import ModelLoadError, OptionError, SaveError
from retrofit.cli import main
from retrofit.readfile import Limits, read_safetensors_header
from retrofit.saving import read_save, save_training_state, tensor_sizes

from .hub_cache import lay_out_folder
from .timeouts import deadline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small retrofitted model and its saves (a folder and a file); tests work on copies."""
    torch.manual_seed(0)
    gm = retrofit.retrofit(retrofit.create_model("test_resnet", num_classes=4), "se", input_size=32).eval()
    root = tmp_path_factory.mktemp("saves")
    return {"model": gm, "folder": retrofit.save(gm, root / "folder"), "file": retrofit.save(gm, root / "m.safetensors")}


def folder_copy(saved: dict[str, Any], dest: Path, edit: Callable[[dict[str, Any]], object] | None = None) -> Path:
    """A copy of the folder save at ``dest``, its recipe.json edited by ``edit(header)``
    (which changes the header, or returns the file's new text)."""
    shutil.copytree(saved["folder"], dest)
    if edit is not None:
        header = json.loads((dest / "recipe.json").read_text())
        text = edit(header)
        (dest / "recipe.json").write_text(text if isinstance(text, str) else json.dumps(header))
    return dest


def forge(path: Path, gm: nn.Module, header: str) -> Path:
    """A .safetensors save of ``gm`` whose metadata holds ``header`` (JSON text)."""
    save_model(gm, str(path), metadata={"retrofit_recipe": header})
    return path


def cli_fails(argv: list[str], capsys: pytest.CaptureFixture[str], match: str) -> str:
    """The command exits 2 with one line on stderr that contains ``match``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err and "internal error" not in err, err
    return err


# --------------------------------------------------------------------------- trusted code


NET = ("open({canary!r}, 'a').write('source ran\\n')\n"
       "import timm\n"
       "def build(num_classes=10):\n"
       "    return timm.create_model('test_resnet', num_classes=num_classes)\n")
EVIL = ("open({canary!r}, 'a').write('pyc ran\\n')\n"
        "def build(num_classes=10):\n"
        "    raise SystemExit('the pyc ran')\n")


def _file_model_save(tmp_path: Path, canary: Path) -> tuple[nn.Module, Path]:
    """A folder save whose model comes from net.py, carried beside recipe.json."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "net.py").write_text(NET.format(canary=str(canary)))
    torch.manual_seed(0)
    gm = retrofit.retrofit(retrofit.create_model(f"{src / 'net.py'}:build", num_classes=3), "eca", input_size=32)
    folder = tmp_path / "save"
    folder.mkdir()
    shutil.copy(src / "net.py", folder / "net.py")
    retrofit.save(gm, folder / "m", model_spec=f"{folder / 'net.py'}:build")
    shutil.move(folder / "net.py", folder / "m" / "net.py")
    header = json.loads((folder / "m" / "recipe.json").read_text())
    header["recipe"]["model"] = "net.py:build"  # beside recipe.json, as a Hub save carries it
    (folder / "m" / "recipe.json").write_text(json.dumps(header))
    canary.unlink()
    return gm.eval(), folder / "m"


def _plant_pyc(model_file: Path, canary: Path) -> Path:
    """An unchecked-hash .pyc beside ``model_file``, holding other code: Python's import
    system would run it without looking at the source."""
    evil = model_file.parent / "evil_src.py"
    evil.write_text(EVIL.format(canary=str(canary)))
    pyc = Path(importlib.util.cache_from_source(str(model_file)))
    py_compile.compile(str(evil), cfile=str(pyc), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    evil.unlink()
    return pyc


def test_a_pyc_shipped_beside_a_trusted_model_file_never_runs(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    gm, folder = _file_model_save(tmp_path, canary)
    pyc = _plant_pyc(folder / "net.py", canary)
    before = pyc.read_bytes()
    x = torch.randn(2, 3, 32, 32)
    loaded = retrofit.load(folder, trust_code=True).eval()
    assert torch.equal(loaded(x), gm(x))
    # the source ran once (one import, although the model is built on the meta device first), the pyc never
    assert canary.read_text() == "source ran\n"
    assert pyc.read_bytes() == before and sorted(p.name for p in pyc.parent.iterdir()) == [pyc.name]  # none written
    assert not any(name.startswith("_retrofit_model_file_") for name in sys.modules)


def test_a_pyc_in_a_hub_snapshot_never_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "canary"
    gm, folder = _file_model_save(tmp_path, canary)
    _plant_pyc(folder / "net.py", canary)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    lay_out_folder(cache, "me/net", folder)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(retrofit.load("hf-hub:me/net", trust_code=True).eval()(x), gm(x))
    assert canary.read_text() == "source ran\n"


@pytest.mark.parametrize("model,sha,message", [
    ("evil.py:build", None, r"names the model file 'evil.py' without its sha256 \(field 'model_sha256'\); not "
                            r"running a file that cannot be checked"),
    ("../elsewhere/evil.py:build", None, r"names the model file '../elsewhere/evil.py', outside the save's folder; "
                                         r"a save carries its model file. Not running it"),
    ("../elsewhere/evil.py:build", "hash", r"names the model file '../elsewhere/evil.py', outside the save's "
                                           r"folder; a save carries its model file. Not running it"),
    ("{abs}:build", "hash", r"names the model file by an absolute path \('/.*evil.py'\); a save names it relative "
                            r"to itself. Not running it"),
])
def test_a_trusted_recipe_needs_a_hash_and_a_relative_path(tmp_path: Path, saved: dict[str, Any], model: str,
                                                           sha: str | None, message: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    canary = tmp_path / "canary"
    (tmp_path / "elsewhere").mkdir()
    evil = tmp_path / "elsewhere" / "evil.py"
    evil.write_text(EVIL.format(canary=str(canary)))
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()

    def edit(header: dict[str, Any]) -> None:
        header["recipe"]["model"] = model.format(abs=evil)
        header["recipe"]["model_sha256"] = digest if sha else None

    path = folder_copy(saved, tmp_path / "save", edit)
    shutil.copy(evil, path / "evil.py")
    with pytest.raises(ModelLoadError, match=message):
        retrofit.load(path, trust_code=True)
    cli_fails(["gates", str(path), "--trust-code", "--data", str(tmp_path), "--out", str(tmp_path / "g.png")], capsys,
              "Not running it" if "Not running it" in message else "without its sha256")
    assert not canary.exists()


def test_a_save_carries_its_model_file_and_a_load_runs_none_outside(tmp_path: Path) -> None:
    """A model built from a file elsewhere: the save carries the file (named by its file name,
    with the sha256 of the bytes written). A recipe edited to name a file outside the save is
    refused before it runs, whatever its hash, unless Limits(model_file_outside_save=True)."""
    canary = tmp_path / "canary"
    (tmp_path / "net.py").write_text(NET.format(canary=str(canary)))
    torch.manual_seed(0)
    gm = retrofit.retrofit(retrofit.create_model(f"{tmp_path / 'net.py'}:build", num_classes=3), "eca", input_size=32)
    (tmp_path / "runs").mkdir()
    path = retrofit.save(gm, tmp_path / "runs" / "m")
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "net.py", "recipe.json"]
    assert (path / "net.py").read_bytes() == (tmp_path / "net.py").read_bytes()
    recipe = read_save(path).recipe
    assert recipe.model == "net.py:build"
    assert recipe.model_sha256 == hashlib.sha256((tmp_path / "net.py").read_bytes()).hexdigest()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(retrofit.load(path, trust_code=True).eval()(x), gm.eval()(x))
    canary.unlink()

    header = json.loads((path / "recipe.json").read_text())
    header["recipe"]["model"] = "../../net.py:build"  # the same bytes, outside the save
    (path / "recipe.json").write_text(json.dumps(header))
    with pytest.raises(ModelLoadError, match=r"names the model file '../../net.py', outside the save's folder; a save "
                                             r"carries its model file. Not running it"):
        retrofit.load(path, trust_code=True)
    assert not canary.exists()
    assert torch.equal(retrofit.load(path, trust_code=True, limits=Limits(model_file_outside_save=True)).eval()(x),
                       gm.eval()(x))
    header["recipe"]["model"] = "net.py:build"
    (path / "recipe.json").write_text(json.dumps(header))
    canary.unlink()
    # a link in the save to another file: the bytes read are what is checked
    (tmp_path / "other.py").write_text(EVIL.format(canary=str(canary)))
    (path / "net.py").unlink()
    (path / "net.py").symlink_to(tmp_path / "other.py")
    with pytest.raises(ModelLoadError, match=r"net.py' is not the file this model was saved with"):
        retrofit.load(path, trust_code=True)
    assert not canary.exists()


def test_a_one_file_save_carries_its_model_file_beside_it(tmp_path: Path) -> None:
    """Beside a one-file save: the model file is written once, kept when it is the same, and
    another file of that name is not overwritten without force."""
    canary = tmp_path / "canary"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "net.py").write_text(NET.format(canary=str(canary)))
    gm = retrofit.retrofit(retrofit.create_model(f"{tmp_path / 'src' / 'net.py'}:build", num_classes=3), "eca",
                           input_size=32)
    (tmp_path / "runs").mkdir()
    retrofit.save(gm, tmp_path / "runs" / "a.safetensors")
    retrofit.save(gm, tmp_path / "runs" / "b.safetensors")  # the same file: kept
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a.safetensors", "b.safetensors", "net.py"]
    assert read_save(tmp_path / "runs" / "b.safetensors").recipe.model == "net.py:build"
    (tmp_path / "runs" / "net.py").write_text("# the user's own file\n")
    with pytest.raises(SaveError, match=r"cannot carry the model file into the save: '.*runs/net.py' exists and holds "
                                        r"other bytes; not overwriting it"):
        retrofit.save(gm, tmp_path / "runs" / "c.safetensors")
    assert not (tmp_path / "runs" / "c.safetensors").exists()
    retrofit.save(gm, tmp_path / "runs" / "c.safetensors", force=True)
    assert (tmp_path / "runs" / "net.py").read_bytes() == (tmp_path / "src" / "net.py").read_bytes()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(retrofit.load(tmp_path / "runs" / "a.safetensors", trust_code=True).eval()(x), gm.eval()(x))


def test_create_model_from_a_file_needs_no_hash(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("import torch.nn as nn\nfrom dataclasses import dataclass\n"
                                   "@dataclass\nclass Cfg:\n    width: int = 4\n"
                                   "def build():\n    return nn.Conv2d(3, Cfg().width, 3)\n")
    assert retrofit.create_model(f"{tmp_path / 'm.py'}:build").out_channels == 4
    assert not (tmp_path / "__pycache__").exists()


# --------------------------------------------------------------------------- regular files, caps


@pytest.mark.parametrize("target", ["fifo", "dev_zero", "folder"])
@pytest.mark.parametrize("which", ["recipe.json", "model.safetensors", "m.safetensors", "best.pt"])
def test_only_regular_files_are_read(tmp_path: Path, saved: dict[str, Any], target: str, which: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    if which in ("recipe.json", "model.safetensors"):
        path = folder_copy(saved, tmp_path / "save")
        victim = path / which
        victim.unlink()
    else:
        path = victim = tmp_path / which
    if target == "fifo":
        os.mkfifo(victim)
    elif target == "dev_zero":
        victim.symlink_to("/dev/zero")
    else:
        victim.mkdir()
    with deadline(30):
        with pytest.raises(ModelLoadError, match=r"not a regular file|no saved model|is a folder"):
            retrofit.load(path)
        assert main(["diff", str(saved["file"]), str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "internal error" not in err


def test_a_checkpoint_for_the_model_command_must_be_a_regular_file(tmp_path: Path) -> None:
    from retrofit.weights import load_checkpoint

    os.mkfifo(tmp_path / "c.pt")
    (tmp_path / "c.safetensors").symlink_to("/dev/zero")
    with deadline(30):
        for name, kind in (("c.pt", "FIFO"), ("c.safetensors", "character device")):
            with pytest.raises(ModelLoadError, match=rf"^cannot read checkpoint '.*{name}': not a regular file \(a "
                                                     rf"{kind}: "):
                load_checkpoint(nn.Linear(2, 2), tmp_path / name)


def test_size_caps(tmp_path: Path, saved: dict[str, Any]) -> None:
    path = folder_copy(saved, tmp_path / "save")
    with pytest.raises(ModelLoadError, match=r"cannot read saved model '.*save' \(recipe.json\): .* bytes, over the "
                                             r"limit of 1000 bytes \(Limits.json_bytes\); if the file is what you "
                                             r"expect, load it with a larger limits=Limits\(json_bytes=...\)"):
        retrofit.load(path, limits=Limits(json_bytes=1000))
    with pytest.raises(ModelLoadError, match=r"over the limit of 1000 bytes \(Limits.weights_bytes\)"):
        retrofit.load(saved["file"], limits=Limits(weights_bytes=1000))
    # a header length of 2**40 bytes in a file of 10: damage, refused from its first 8 bytes
    big = tmp_path / "big.safetensors"
    big.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match=r"cannot read saved model '.*big.safetensors' \(corrupted\?\): its "
                                             r"header claims to be 1099511627776 bytes long, but the whole file has "
                                             r"10 bytes \(truncated, or not a safetensors file\)"):
        retrofit.load(big)
    # a header longer than the cap, in a file that holds it: over the limit
    with pytest.raises(ModelLoadError, match=r"the header of saved model '.*m.safetensors': .* over the limit of 100 "
                                             r"bytes \(Limits.header_bytes\)"):
        retrofit.load(saved["file"], limits=Limits(header_bytes=100))
    # the default limits hold what a save needs
    assert isinstance(retrofit.load(path), nn.Module)


def test_permission_denied_says_so(tmp_path: Path, saved: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    path = folder_copy(saved, tmp_path / "save")
    if os.geteuid() != 0:
        (path / "recipe.json").chmod(0)
    else:  # root reads every file: the error the system gives anyone else
        real_open = os.open

        def denied(p: Any, *args: Any, **kwargs: Any) -> int:
            if str(p).endswith("recipe.json"):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(p, *args, **kwargs)

        monkeypatch.setattr("retrofit.readfile.os.open", denied)
    with pytest.raises(ModelLoadError, match=r"cannot read saved model '.*save' \(recipe.json\): permission denied; "
                                             r"check the file's permissions"):
        retrofit.load(path)
    monkeypatch.setattr("retrofit.saving.os.access", lambda *args: False)  # the folder itself
    with pytest.raises(ModelLoadError, match=r"cannot read saved model '.*save': permission denied \(the folder\)"):
        retrofit.load(path)


# --------------------------------------------------------------------------- check before allocating


@pytest.mark.parametrize("field,value,tensor,got,want", [
    ("attn_args", {"rd_channels": 1_000_000}, "layer1.0.se.fc1.weight", "[1000000, 32, 1, 1]", "[8, 32, 1, 1]"),
    ("model_kwargs", {"num_classes": 5_000_000}, "fc.weight", "[5000000, 96]", "[4, 96]"),
])
def test_a_recipe_asking_for_a_huge_model_is_refused_before_building(tmp_path: Path, saved: dict[str, Any],
                                                                     field: str, value: dict[str, int], tensor: str,
                                                                     got: str, want: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = folder_copy(saved, tmp_path / "save", lambda h: h["recipe"][field].update(value))
    real = retrofit.build.build_model
    monkeypatch.setattr(retrofit.build, "build_model", lambda *a, **k: pytest.fail("built for real"))
    shapes = rf"{re.escape(got)}, its weights hold {re.escape(want)}"
    with pytest.raises(ModelLoadError, match=rf"its recipe builds tensor '{tensor}' of shape {shapes}; the file does "
                                             r"not match its own recipe .*; nothing was built"):
        retrofit.load(path)
    monkeypatch.setattr(retrofit.build, "build_model", real)


def test_the_huge_models_cost_no_memory(tmp_path: Path, saved: dict[str, Any]) -> None:
    """Peak memory of a fresh process that loads both edited saves (before the check: 3.6 GB
    and 4.5 GB; a valid load of the same save peaks near 0.7 GB)."""
    folder_copy(saved, tmp_path / "rd", lambda h: h["recipe"]["attn_args"].update(rd_channels=1_000_000))
    folder_copy(saved, tmp_path / "nc", lambda h: h["recipe"]["model_kwargs"].update(num_classes=5_000_000))
    # VmHWM is this process's own peak: ru_maxrss also counts the parent's peak before exec
    # (Linux keeps it across vfork + exec), which under a long pytest run is gigabytes.
    code = ("import sys, retrofit\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n        retrofit.load(p)\n    except retrofit.ModelLoadError as e:\n        print(e)\n"
            "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "rd"), str(tmp_path / "nc")], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 3 and all("nothing was built" in line for line in lines[:2]), r.stderr
    assert int(lines[-1]) < 1_500_000, f"peak RSS {int(lines[-1]) // 1024} MB"  # kB


def test_a_header_that_lies_about_its_tensors_is_refused(tmp_path: Path, saved: dict[str, Any]) -> None:
    """The shapes compared are checked against the file's size first: a header that claims
    a large tensor over a few bytes is corrupted, not a model to build."""
    data = saved["file"].read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["fc.weight"]["shape"] = [5_000_000, 96]
    raw = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(ModelLoadError, match=r"\(corrupted\?\): tensor 'fc.weight': shape \[5000000, 96\] of F32 "
                                             r"needs 1920000000 bytes, its data_offsets give 1536"):
        retrofit.load(bad)
    header["fc.weight"]["shape"], header["fc.weight"]["dtype"] = [4, 96], "F4"
    raw = json.dumps(header).encode()
    bad.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
    with pytest.raises(ModelLoadError, match=r"tensor 'fc.weight': unknown dtype 'F4'"):
        tensor_sizes(bad)
    assert read_safetensors_header(saved["file"], "x").tensors["fc.weight"].shape == (4, 96)


def test_buffers_the_file_does_not_hold_are_capped(tmp_path: Path, saved: dict[str, Any]) -> None:
    with pytest.raises(ModelLoadError, match=r"elements in tensors its weights do not hold, over the limit of 1 "
                                             r"\(Limits.unsaved_elements\)"):
        retrofit.load(_with_unsaved_buffer(tmp_path, saved), trust_code=True, limits=Limits(unsaved_elements=1))
    assert isinstance(retrofit.load(tmp_path / "m.safetensors", trust_code=True), nn.Module)  # the default holds it


def _with_unsaved_buffer(tmp_path: Path, saved: dict[str, Any]) -> Path:
    """A save of a model file whose model has a non-persistent buffer."""
    (tmp_path / "net.py").write_text(
        "import torch, timm\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, num_classes=4):\n"
        "        super().__init__()\n"
        "        self.body = timm.create_model('test_resnet', num_classes=num_classes)\n"
        "        self.register_buffer('scale', torch.ones(num_classes), persistent=False)\n"
        "    def forward(self, x):\n"
        "        return self.body(x) * self.scale\n"
        "def build(num_classes=4):\n"
        "    return Net(num_classes)\n")
    gm = retrofit.retrofit(retrofit.create_model(f"{tmp_path / 'net.py'}:build"), "se", input_size=32)
    return retrofit.save(gm, tmp_path / "m.safetensors")


# --------------------------------------------------------------------------- exit 2, never 3


def _chain(header: dict[str, Any], depth: int) -> str:
    """The header's text with its recipe stacked ``depth`` times on itself (json.dumps
    cannot write that deep a nesting)."""
    recipe = {k: v for k, v in header["recipe"].items() if k != "base"}
    level = json.dumps(recipe)[:-1] + ', "base": '
    rest = {k: v for k, v in header.items() if k != "recipe"}
    return '{"recipe": ' + level * depth + json.dumps(recipe) + "}" * depth + ", " + json.dumps(rest)[1:]


@pytest.mark.parametrize("name,edit,message", [
    ("nested 200k deep", lambda h: "[" * 200_000 + "]" * 200_000,
     r"nests deeper than the limit of 128 \(Limits.json_depth\)"),
    ("a 3,000-deep base chain", lambda h: _chain(h, 3000), r"nests deeper than the limit of 128 \(Limits.json_depth\)"),
    ("a 100-deep base chain", lambda h: _chain(h, 100),
     r"the recipe stacks more than 64 retrofits \(Limits.base_chain, field 'base'\)"),
    ("buffers: 5", lambda h: h.update(buffers=5), r"field 'buffers' is a int \(5\), not a list of tensor names"),
    ("versions as a list", lambda h: h.update(versions=["1"]), r"field 'versions' is a list \(\['1'\]\), not a table"),
    ("versions as a string", lambda h: h.update(versions="1.0"), r"field 'versions' is a str \('1.0'\), not a table"),
    ("a negative input_size", lambda h: h["recipe"].update(input_size=[3, -32, 32]),
     r"recipe field 'input_size' is \[3, -32, 32\]; valid: 1 to 3 integers >= 1"),
    ("a huge input_size", lambda h: h["recipe"].update(input_size=[3, 100000, 100000]),
     r"asks for 30000000000 elements per image, over the limit of 268435456 \(Limits.input_elements\)"),
    ("an unknown act_layer", lambda h: h["recipe"]["model_kwargs"].update(act_layer="nope"),
     r"cannot build timm model 'test_resnet' with .*act_layer='nope'.*: KeyError: 'nope'"),
    ("a model_sha256 that is no hash", lambda h: h["recipe"].update(model_sha256="x" * 64),
     r"recipe field 'model_sha256' is 'x+', not a sha256"),
    ("attn_args as a list", lambda h: h["recipe"].update(attn_args=[1]), r"recipe field 'attn_args' is a list"),
])
def test_input_errors_are_load_errors(tmp_path: Path, saved: dict[str, Any], name: str,
                                      edit: Callable[[dict[str, Any]], object], message: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = folder_copy(saved, tmp_path / "save", edit)
    with deadline(60):
        with pytest.raises(ModelLoadError, match=message):
            retrofit.load(path)
        cli_fails(["gates", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "g.png")], capsys,
                  "error: ")
        if "act_layer" not in name:  # diff reads the files and builds nothing
            cli_fails(["diff", str(saved["folder"]), str(path)], capsys, "error: ")


def test_the_same_in_a_file_save(tmp_path: Path, saved: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    header = {"format": "retrofit/2", "recipe": read_save(saved["folder"]).recipe.to_dict(), "versions": {},
              "buffers": []}
    path = forge(tmp_path / "m.safetensors", saved["model"], _chain(header, 3000))
    with pytest.raises(ModelLoadError, match=r"m.safetensors' \(its recipe\): its JSON nests deeper than the limit"):
        retrofit.load(path)
    cli_fails(["diff", str(path), str(path)], capsys, "nests deeper")


@pytest.mark.parametrize("model,message", [
    (None, r"the checkpoint has no 'model' entry, not the model's weights"),
    (5, r"the checkpoint has a 'model' entry that is a int, not the model's weights"),
    ({"fc.weight": [1, 2]}, r"the checkpoint's 'model' entry 'fc.weight' is a list, not a tensor"),
])
def test_a_checkpoint_without_its_weights(tmp_path: Path, saved: dict[str, Any], model: Any, message: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    payload = {"recipe": retrofit.get_recipe(saved["model"]).to_dict(), "versions": {}, "buffers": []}
    if model is not None:
        payload["model"] = model
    path = save_training_state(tmp_path / "best.pt", payload)
    with pytest.raises(ModelLoadError, match=message):
        retrofit.load(path)
    with pytest.raises(ModelLoadError, match=message):
        tensor_sizes(path)
    cli_fails(["diff", str(path), str(path)], capsys, "not the model's weights" if not isinstance(model, dict)
              else "not a tensor")


def test_a_checkpoint_that_expands_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * (16 << 20))
    with pytest.raises(ModelLoadError, match=r"its records expand to 16777216 bytes from \d+ \(over "
                                             r"Limits.checkpoint_expansion = 2.0\)"):
        retrofit.load(path)


def test_devices_that_are_not_here(tmp_path: Path, saved: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(OptionError, match=r"map_location = 'cuda': no CUDA device here \(torch.cuda.is_available\(\) "
                                          r"is False\); use cpu"):
        retrofit.load(saved["file"], map_location="cuda")
    with pytest.raises(OptionError, match=r"map_location = 'gpu:0' is not a device"):
        retrofit.load(saved["file"], map_location="gpu:0")
    path = folder_copy(saved, tmp_path / "save", lambda h: h["recipe"]["model_kwargs"].update(device="cuda"))
    with pytest.raises(ModelLoadError, match=r"the model argument device = 'cuda': no CUDA device here"):
        retrofit.load(path)
    cli_fails(["gates", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "g.png")], capsys,
              "no CUDA device here")


def test_a_device_argument_is_built_on_the_meta_device_first(tmp_path: Path, saved: dict[str, Any]) -> None:
    """A recipe's ``device`` model argument cannot make the check build for real."""
    path = folder_copy(saved, tmp_path / "save", lambda h: h["recipe"]["model_kwargs"].update(
        device="cpu", num_classes=5_000_000))
    with pytest.raises(ModelLoadError, match=r"its recipe builds tensor 'fc.weight' of shape \[5000000, 96\]"):
        retrofit.load(path)


def test_memory_errors_from_file_content(tmp_path: Path, saved: dict[str, Any],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = folder_copy(saved, tmp_path / "save")

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr("retrofit.readfile.json", types.SimpleNamespace(loads=no_memory))
    with pytest.raises(ModelLoadError, match=r"its JSON does not fit in memory; is it corrupted\?"):
        retrofit.load(path)


# --------------------------------------------------------------------------- old checkpoints


def _old_checkpoint(folder: Path, saved: dict[str, Any], rules: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"model": "test_resnet", "model_kwargs": {"num_classes": 4}, "rules": rules, "input_size": [3, 32, 32]}
    torch.save({"format": "retrofit-train/1", "spec": spec, "model": saved["model"].state_dict()}, folder / "best.pt")
    return folder / "best.pt"


SE_RULES = '[[rule]]\nat = "residual-add"\nattn = "se"\nposition = "branch"\n' \
           '[[rule]]\nat = "conv-block"\nattn = "se"\nfallback = true\n'


def test_an_old_checkpoint_reads_its_rule_file_from_its_own_folder(tmp_path: Path, saved: dict[str, Any],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    canary_rules = 'description = "from the current folder"\n[[rule]]\nat = "residual-add"\nattn = "eca"\n'
    (tmp_path / "rules.toml").write_text(canary_rules)  # in the current folder and above the checkpoint
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    path = _old_checkpoint(run, saved, "rules.toml")
    with pytest.raises(ModelLoadError, match=r"cannot read .*best.pt's rule file 'rules.toml': not found"):
        retrofit.load(path)
    (run / "rules.toml").write_text(SE_RULES)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(retrofit.load(path).eval()(x), saved["model"](x))
    for rules, message in (("../rules.toml", "lies outside the checkpoint's folder"),
                           (str(tmp_path / "rules.toml"), "lies outside the checkpoint's folder")):
        path = _old_checkpoint(run, saved, rules)
        with pytest.raises(ModelLoadError, match=rf"its rule file '{rules}' {message}; an old checkpoint's rule "
                                                 r"file is read from beside it"):
            retrofit.load(path)
    (run / "link.toml").symlink_to(tmp_path / "rules.toml")
    with pytest.raises(ModelLoadError, match=r"its rule file 'link.toml' leads outside the checkpoint's folder"):
        retrofit.load(_old_checkpoint(run, saved, "link.toml"))


def test_an_index_naming_files_outside_the_folder(tmp_path: Path, saved: dict[str, Any]) -> None:
    path = folder_copy(saved, tmp_path / "save")
    (path / "model.safetensors").rename(path / "shard-1.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../shard-1.safetensors"}}))
    with pytest.raises(ModelLoadError, match=r"its weight_map names '../shard-1.safetensors', not a file in the "
                                             r"folder"):
        retrofit.load(path)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(retrofit.load(path).eval()(x), saved["model"](x))
