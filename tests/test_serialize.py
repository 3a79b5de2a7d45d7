"""Save and load: bit-identical round trips, atomic writes, clear errors; checkpoints in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import retrofit
from retrofit import ModelLoadError, OptionError, SaveError
from retrofit.checkpoint import load_checkpoint
from retrofit.serialize import read_recipe

from .conftest import SmallCNN, build


def _perturbed(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Move every weight off its init, as fine-tuning would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return gm


@pytest.mark.parametrize("spec,attn,layout", [
    ("resnet18", "cbam", "file.safetensors"),
    ("resnet50d", "se-mid", "folder"),
    ("tv:mobilenet_v3_large", "eca", "file.safetensors"),
])
def test_round_trip_is_bit_identical(tmp_path: Path, spec: str, attn: str, layout: str) -> None:
    model = build(spec)
    gm = _perturbed(retrofit.retrofit(model, attn, input_size=64))
    model_spec = f"torchvision:{spec[3:]}" if spec.startswith("tv:") else None
    path = retrofit.save(gm, tmp_path / layout, model_spec=model_spec)
    loaded = retrofit.load(path)
    x = torch.randn(2, 3, 64, 64)
    gm.eval(), loaded.eval()
    assert torch.equal(gm(x), loaded(x))
    assert gm.state_dict().keys() == loaded.state_dict().keys()
    recipe = read_recipe(path)
    assert recipe["format"] == "retrofit/1" and recipe["versions"]["torch"] == torch.__version__
    assert recipe["model"]["spec"] == (model_spec or spec)


def test_folder_has_readable_recipe(tmp_path: Path) -> None:
    gm = retrofit.retrofit(build("resnet18"), "se", input_size=64, gate="sigmoid")
    retrofit.save(gm, tmp_path / "out")
    recipe = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert recipe["model"] == {"spec": "resnet18", "kwargs": {"num_classes": 1000}}
    assert recipe["retrofit"]["gate"] == "sigmoid" and recipe["retrofit"]["rules"]["doc"]["rule"][0]["attn"] == "se"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "recipe.json"]


def test_user_model_from_file_round_trips(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text("from tests.conftest import SmallCNN\ndef build(num_classes=10):\n"
                                     "    return SmallCNN(num_classes=num_classes)\n")
    gm = _perturbed(retrofit.retrofit(SmallCNN(num_classes=5), "cbam", input_size=(1, 28, 28)))
    path = retrofit.save(gm, tmp_path / "m.safetensors", model_spec=f"{tmp_path / 'net.py'}:build",
                         model_kwargs={"num_classes": 5})
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(gm.eval()(x), retrofit.load(path).eval()(x))


def test_existing_file_is_never_overwritten_without_force(tmp_path: Path) -> None:
    gm = retrofit.retrofit(build("resnet18"), "eca", input_size=64)
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"precious")
    with pytest.raises(SaveError, match=r"m.safetensors' exists; not overwriting it \(pass --force / force=True"):
        retrofit.save(gm, target)
    assert target.read_bytes() == b"precious"
    retrofit.save(gm, target, force=True)
    assert retrofit.load(target) is not None
    folder = tmp_path / "f"
    retrofit.save(gm, folder)
    retrofit.save(gm, folder, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "m.safetensors"]


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gm = retrofit.retrofit(build("resnet18"), "eca", input_size=64)

    def broken(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")  # a partial write, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("retrofit.serialize.save_model", broken)
    for name in ("m.safetensors", "folder"):
        with pytest.raises(SaveError, match=r"cannot write .*: No space left on device"):
            retrofit.save(gm, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gm = retrofit.retrofit(build("resnet18"), "eca", input_size=64)

    def interrupted(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("retrofit.serialize.save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        retrofit.save(gm, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination(tmp_path: Path) -> None:
    gm = retrofit.retrofit(build("resnet18"), "eca", input_size=64)
    with pytest.raises(SaveError, match=r"cannot write .*: folder .*missing.* does not exist"):
        retrofit.save(gm, tmp_path / "missing" / "m.safetensors")


def test_model_without_origin_needs_spec(tmp_path: Path) -> None:
    gm = retrofit.retrofit(SmallCNN(), "se", input_size=(1, 28, 28))
    with pytest.raises(OptionError, match=r"cannot tell which model .* was built from; pass model_spec="):
        retrofit.save(gm, tmp_path / "m.safetensors")
    with pytest.raises(OptionError, match=r"did not come from retrofit\(\)"):
        retrofit.save(torch.fx.symbolic_trace(SmallCNN()), tmp_path / "m.safetensors", model_spec="x.py:f")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no saved model at .*nothing.safetensors"):
        retrofit.load(tmp_path / "nothing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match=r"cannot read saved model .*bad.safetensors' \(corrupted\?\)"):
        retrofit.load(bad)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelLoadError, match=r"safetensors file without a retrofit recipe; load plain weights"):
        retrofit.load(plain)


def test_truncated_weights_are_reported(tmp_path: Path) -> None:
    gm = retrofit.retrofit(build("resnet18"), "eca", input_size=64)
    path = retrofit.save(gm, tmp_path / "m")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"corrupted|do not fit"):
        retrofit.load(path)


# --- checkpoints loaded before retrofitting --------------------------------------------


def test_checkpoint_formats(tmp_path: Path) -> None:
    src = build("resnet18")
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "c.pth")
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "c.safetensors"))
    for name in ("c.pth", "c.safetensors"):
        dst = build("resnet18")
        with torch.no_grad():
            dst.fc.weight.zero_()
        load_checkpoint(dst, tmp_path / name)
        assert torch.equal(dst.fc.weight, src.fc.weight)


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b"garbage" * 10),
     r"cannot read checkpoint .*c.pt' \(corrupted or not a checkpoint\)"),
    (lambda p: torch.save({"fc.weight": torch.zeros(3, 512)}, p),
     r"does not fit ResNet: 121 missing \(e.g. conv1.weight.*1 of another shape \(e.g. fc.weight \[3, 512\] vs "
     r"\[1000, 512\]\); check the model name and --num-classes"),
    (lambda p: torch.save({**build("resnet18").state_dict(), "layer1.0.se.fc1.weight": torch.zeros(1)}, p),
     r"1 unexpected \(e.g. layer1.0.se.fc1.weight\); is it an already retrofitted model\? load those with retrofit.load"),
    (lambda p: torch.save({"x": [1, 2]}, p), r"holds no state dict"),
])
def test_bad_checkpoints(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "c.pt"
    make(path)
    with pytest.raises(ModelLoadError, match=message):
        load_checkpoint(build("resnet18"), path)


def test_checkpoint_suffix_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"unknown suffix '.ckpt' \(valid: .safetensors, .pt, .pth, .bin\)"):
        load_checkpoint(build("resnet18"), tmp_path / "c.ckpt")
    with pytest.raises(ModelLoadError, match=r"checkpoint .*c.pt' not found"):
        load_checkpoint(build("resnet18"), tmp_path / "c.pt")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    torch.save({"model": build("small_cnn")}, tmp_path / "whole.pt")  # a pickled module, not weights
    with pytest.raises(ModelLoadError, match=r"cannot read checkpoint .*weights_only|corrupted or not a checkpoint"):
        load_checkpoint(build("small_cnn"), tmp_path / "whole.pt")
