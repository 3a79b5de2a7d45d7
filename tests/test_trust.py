"""Loading files from others runs no code the user did not allow.

Each attack writes a file whose recipe names code that would create a sentinel file; the
test checks that loading is refused with the trust switch named, that the sentinel never
appears and that nothing was imported. With trust, what was saved loads bit for bit, and
a model file that changed since the save is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from torch import nn

import retrofit
from retrofit import ModelLoadError, UntrustedCodeError
from retrofit.cli import main
from retrofit.saving import save_training_state

ROOT = Path(__file__).resolve().parents[1]
TRUST = r"trust_code=True in Python, --trust-code on the command line"


@pytest.fixture(scope="module")
def legit() -> nn.Module:
    torch.manual_seed(0)
    return retrofit.retrofit(retrofit.create_model("resnet18", num_classes=4), "se", input_size=64)


def forge(path: Path, gm: nn.Module, **changes: object) -> Path:
    """A .safetensors save of ``gm`` whose recipe is changed as an attacker would."""
    recipe = {**retrofit.get_recipe(gm).to_dict(), **changes}
    header = {"format": "retrofit/2", "recipe": recipe, "versions": {}, "buffers": []}
    save_model(gm, str(path), metadata={"retrofit_recipe": json.dumps(header)})
    return path


def evil_source(sentinel: Path) -> str:
    return (f"open({str(sentinel)!r}, 'w').write('imported')\n"
            "def build(**kwargs):\n"
            f"    open({str(sentinel)!r}, 'w').write('ran')\n"
            "    import timm\n"
            "    return timm.create_model('resnet18', **kwargs)\n")


def test_a_stdlib_function_as_factory(tmp_path: Path, legit: nn.Module) -> None:
    sentinel = tmp_path / "pwned"
    path = forge(tmp_path / "m.safetensors", legit, model=f"{os.__file__}:system",
                 model_kwargs={"command": f"touch {sentinel}"})
    with pytest.raises(UntrustedCodeError, match=rf"m.safetensors asks to run code: the model file '.*os.py' "
                                                 rf"\(its function 'system' builds the model\)\. Nothing was imported; "
                                                 rf"load it only if you trust where it came from: {TRUST}"):
        retrofit.load(path)
    assert not sentinel.exists()


def test_a_model_file_shipped_in_the_save_folder(tmp_path: Path, legit: nn.Module) -> None:
    sentinel = tmp_path / "pwned"
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "helper.py").write_text(evil_source(sentinel))
    forge(folder / "m.safetensors", legit, model="helper.py:build",
          model_sha256=hashlib.sha256((folder / "helper.py").read_bytes()).hexdigest())
    with pytest.raises(UntrustedCodeError, match=rf"the model file 'helper.py' \(its function 'build' builds the model\).*{TRUST}"):
        retrofit.load(folder / "m.safetensors")
    assert not sentinel.exists() and "helper" not in sys.modules


def test_a_file_planted_in_the_current_folder_is_never_run(tmp_path: Path, legit: nn.Module,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = tmp_path / "pwned"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "helper.py").write_text(evil_source(sentinel))
    (tmp_path / "save").mkdir()
    path = forge(tmp_path / "save" / "m.safetensors", legit, model="helper.py:build")
    monkeypatch.chdir(cwd)
    with pytest.raises(UntrustedCodeError, match=TRUST):
        retrofit.load(path)
    # even with trust, the file is looked for beside the save, not in the current folder
    with pytest.raises(ModelLoadError, match=r"model file '.*save/helper.py' not found \(the recipe names "
                                             r"'helper.py:build', relative to the save\)"):
        retrofit.load(path, trust_code=True)
    assert not sentinel.exists()


@pytest.mark.parametrize("where", ["leaf_modules", "rules", "model_kwargs"])
def test_imports_named_by_a_recipe(tmp_path: Path, legit: nn.Module, monkeypatch: pytest.MonkeyPatch,
                                   where: str) -> None:
    sentinel = tmp_path / "pwned"
    (tmp_path / "evilpkg_trust_test.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('imported')\nimport torch\nclass Gate(torch.nn.Identity):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = retrofit.get_recipe(legit).to_dict()
    if where == "leaf_modules":
        changes: dict[str, object] = {"leaf_modules": ["evilpkg_trust_test:Gate"]}
        message = r"the leaf-module class 'evilpkg_trust_test:Gate'"
    elif where == "rules":
        rules = json.loads(json.dumps(recipe["rules"]))
        rules["rule"][0]["attn"] = "evilpkg_trust_test:Gate"
        changes = {"rules": rules}
        message = r"the attention class 'evilpkg_trust_test:Gate' \(built-in 'se', rule 1\)"
    else:  # timm reads `checkpoint_path` with pickle
        changes = {"model_kwargs": {"num_classes": 4, "checkpoint_path": str(tmp_path / "evil.pth")}}
        message = r"the model argument checkpoint_path='.*evil.pth', which loads a file"
    path = forge(tmp_path / "m.safetensors", legit, **changes)
    with pytest.raises(UntrustedCodeError, match=rf"{message}.*{TRUST}"):
        retrofit.load(path)
    assert not sentinel.exists() and "evilpkg_trust_test" not in sys.modules


def _evil_checkpoint(tmp_path: Path, legit: nn.Module) -> tuple[Path, Path]:
    """A fine-tuning checkpoint (read with weights_only=True) whose recipe names a file."""
    sentinel = tmp_path / "pwned"
    (tmp_path / "evil.py").write_text(evil_source(sentinel))
    recipe = {**retrofit.get_recipe(legit).to_dict(), "model": "evil.py:build"}
    path = save_training_state(tmp_path / "best.pt", {"recipe": recipe, "model": legit.state_dict(),
                                                      "versions": {}, "buffers": []})
    return path, sentinel


def test_gates_command_refuses_a_checkpoint_that_names_code(tmp_path: Path, legit: nn.Module,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, sentinel = _evil_checkpoint(tmp_path, legit)
    assert main(["gates", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2  # errors: cli.main
    err = capsys.readouterr().err
    assert "asks to run code: the model file 'evil.py'" in err and "--trust-code" in err and len(err.splitlines()) == 1
    assert not sentinel.exists()


def test_resuming_fine_tuning_refuses_a_checkpoint_that_names_code(tmp_path: Path, legit: nn.Module) -> None:
    path, sentinel = _evil_checkpoint(tmp_path, legit)
    r = subprocess.run([sys.executable, "examples/finetune.py", "--digits", "--resume", str(path), "--out",
                        str(tmp_path / "run"), "--workers", "0", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "asks to run code" in r.stderr and "--trust-code" in r.stderr
    assert not sentinel.exists() and not (tmp_path / "run").exists()


def test_trusted_model_file_loads_bit_identically_and_a_changed_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text("import timm\ndef build(num_classes=10):\n"
                                     "    return timm.create_model('resnet18', num_classes=num_classes)\n")
    torch.manual_seed(0)
    gm = retrofit.retrofit(retrofit.create_model(f"{tmp_path / 'net.py'}:build", num_classes=3), "eca", input_size=64)
    (tmp_path / "save").mkdir()
    path = retrofit.save(gm, tmp_path / "save" / "m.safetensors")
    recipe = retrofit.saving.read_save(path).recipe
    assert recipe.model == "net.py:build"  # carried beside the save, with the file's hash
    assert recipe.model_sha256 == hashlib.sha256((tmp_path / "net.py").read_bytes()).hexdigest()
    assert (tmp_path / "save" / "net.py").read_bytes() == (tmp_path / "net.py").read_bytes()
    loaded = retrofit.load(path, trust_code=True)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(gm.eval()(x), loaded.eval()(x))
    old = recipe.model_sha256
    with (tmp_path / "save" / "net.py").open("a") as f:
        f.write("# changed\n")
    new = hashlib.sha256((tmp_path / "save" / "net.py").read_bytes()).hexdigest()
    with pytest.raises(ModelLoadError, match=rf"is not the file this model was saved with \(sha256 {new} now, "
                                             rf"{old} when saved\); not running it"):
        retrofit.load(path, trust_code=True)


def test_what_loads_without_trust(tmp_path: Path) -> None:
    """Registry names (timm, torchvision), built-in attention, types registered in this
    process and leaf classes of modules already imported need no trust."""

    @retrofit.register_attention("trust_test_gate")
    class Gate(nn.Identity):
        def __init__(self, channels: int, gate: str = "identity", **kwargs: object) -> None:
            super().__init__()

    torch.manual_seed(0)
    base = retrofit.create_model("torchvision:resnet18", num_classes=3)
    gm = retrofit.retrofit(base, "trust_test_gate", input_size=64, leaf_modules=[nn.ReLU, "layer4.1"])
    assert retrofit.get_recipe(gm).options.leaf_modules == ("torch.nn.modules.activation:ReLU", "layer4.1")
    path = retrofit.save(gm, tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(gm.eval()(x), retrofit.load(path).eval()(x))
