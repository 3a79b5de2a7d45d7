"""Save and load: bit-identical round trips in every form and dtype, atomic writes that
replace only their own files, clear errors; plain checkpoints in. The trust tests are in
test_trust.py."""

from __future__ import annotations

import copy
import io
import json
import os
import stat
from pathlib import Path

import pytest
import timm
import torch

import retrofit
from retrofit import ModelLoadError, OptionError, SaveError
from retrofit.saving import read_save
from retrofit.weights import load_checkpoint

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
    saved = read_save(path)
    assert saved.versions["torch"] == torch.__version__
    assert saved.recipe.model == (model_spec or spec) and saved.recipe == retrofit.get_recipe(loaded)


def test_folder_has_readable_recipe(tmp_path: Path) -> None:
    gm = retrofit.retrofit(build("resnet18"), "se", input_size=64, gate="sigmoid")
    retrofit.save(gm, tmp_path / "out")
    header = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert header["format"] == "retrofit/2"
    recipe = header["recipe"]
    assert (recipe["model"], recipe["model_kwargs"]) == ("resnet18", {"num_classes": 1000})
    assert recipe["gate"] == "sigmoid" and recipe["rules"]["rule"][0]["attn"] == "se"
    assert recipe["input_size"] == [3, 64, 64] and recipe["rules_name"] == "built-in 'se'"
    assert "bn1.running_mean" in header["buffers"] and "conv1.weight" not in header["buffers"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", "recipe.json"]


def test_user_model_from_file_round_trips(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text("from tests.conftest import SmallCNN\ndef build(num_classes=10):\n"
                                     "    return SmallCNN(num_classes=num_classes)\n")
    gm = _perturbed(retrofit.retrofit(SmallCNN(num_classes=5), "cbam", input_size=(1, 28, 28)))
    path = retrofit.save(gm, tmp_path / "m.safetensors", model_spec=f"{tmp_path / 'net.py'}:build",
                         model_kwargs={"num_classes": 5})
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(gm.eval()(x), retrofit.load(path, trust_code=True).eval()(x))
    with pytest.raises(retrofit.UntrustedCodeError, match="the model file 'net.py'"):
        retrofit.load(path)  # the file names code to run: only with trust


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

    monkeypatch.setattr("retrofit.saving.save_model", broken)
    for name in ("m.safetensors", "folder"):
        with pytest.raises(SaveError, match=r"cannot write .*: No space left on device"):
            retrofit.save(gm, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gm = retrofit.retrofit(build("resnet18"), "eca", input_size=64)

    def interrupted(*args, **kwargs):
        Path(args[1]).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("retrofit.saving.save_model", interrupted)
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


# --- round trips give back what was saved ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(tmp_path: Path, dtype: torch.dtype) -> None:
    gm = _perturbed(retrofit.retrofit(retrofit.create_model("resnet18", num_classes=10), "cbam", input_size=64))
    gm = gm.to(dtype).eval()
    loaded = retrofit.load(retrofit.save(gm, tmp_path / "m.safetensors")).eval()
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {dtype}
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    assert torch.equal(gm(x), loaded(x))  # half input works: the model is half again


def test_mixed_dtypes_come_back_per_tensor(tmp_path: Path) -> None:
    gm = retrofit.retrofit(retrofit.create_model("resnet18", num_classes=10), "se", input_size=64)
    gm.layer4.half()  # one stage in fp16, the rest fp32
    loaded = retrofit.load(retrofit.save(gm, tmp_path / "m"))
    want = {k: v.dtype for k, v in gm.state_dict().items()}
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == want
    assert want["layer4.0.conv1.weight"] == torch.float16 and want["conv1.weight"] == torch.float32


def test_keep_class_and_num_classes_round_trip(tmp_path: Path) -> None:
    base = retrofit.create_model("resnet18", num_classes=7)
    kc = _perturbed(retrofit.retrofit(base, "se", input_size=64, keep_class=True))
    loaded = retrofit.load(retrofit.save(kc, tmp_path / "kc.safetensors"))
    assert type(loaded) is type(base) and loaded.get_classifier().out_features == 7
    assert retrofit.get_recipe(loaded).options.keep_class
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(kc.eval()(x), loaded.eval()(x))


def test_torchvision_segmentation_model_by_name(tmp_path: Path) -> None:
    base = retrofit.create_model("torchvision:lraspp_mobilenet_v3_large", num_classes=3)
    gm = _perturbed(retrofit.retrofit(base, "se", input_size=64))
    path = retrofit.save(gm, tmp_path / "seg")
    assert read_save(path).recipe.model == "torchvision:lraspp_mobilenet_v3_large"
    loaded = retrofit.load(path)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(gm.eval()(x)["out"], loaded.eval()(x)["out"])


def test_torchvision_detection_builds_offline_without_backbone_weights() -> None:
    # weights_backbone defaults to ImageNet weights, a download; fresh weights mean none
    model = retrofit.create_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=5)
    assert retrofit.get_recipe(model).model_kwargs == {"num_classes": 5}
    assert model.roi_heads.box_predictor.cls_score.out_features == 5


def test_copied_and_pickled_models_can_be_saved(tmp_path: Path) -> None:
    gm = _perturbed(retrofit.retrofit(retrofit.create_model("resnet18", num_classes=4), "eca", input_size=64))
    buf = io.BytesIO()
    torch.save(gm, buf)  # a whole pickled GraphModule: the user's own file, read back by the user
    buf.seek(0)
    for i, copied in enumerate((copy.deepcopy(gm), torch.load(buf, weights_only=False))):
        assert retrofit.get_report(copied).rows == retrofit.get_report(gm).rows
        loaded = retrofit.load(retrofit.save(copied, tmp_path / f"c{i}.safetensors"))
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(gm.eval()(x), loaded.eval()(x))


def test_stacked_retrofit_round_trips(tmp_path: Path) -> None:
    once = retrofit.retrofit(retrofit.create_model("resnet18", num_classes=4), "se", input_size=64)
    twice = _perturbed(retrofit.retrofit(once, "eca", input_size=64, on_existing="stack"))
    recipe = retrofit.get_recipe(twice)
    assert recipe.base is not None and recipe.base.rules_name == "built-in 'se'" and recipe.model is None
    loaded = retrofit.load(retrofit.save(twice, tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(twice.eval()(x), loaded.eval()(x))


def test_save_checks_the_recipe_before_writing(tmp_path: Path) -> None:
    # timm names its architecture, not its other arguments: in_chans=1 is not recorded
    gm = retrofit.retrofit(timm.create_model("resnet18", in_chans=1, num_classes=3), "se", input_size=(1, 64, 64))
    with pytest.raises(OptionError, match=r"not saved: the recipe \(model 'resnet18', arguments \{'num_classes': 3\}\) "
                                          r"builds a model that has 1 of another shape \(e.g. conv1.weight \[64, 3, 7, 7\] "
                                          r"instead of \[64, 1, 7, 7\]\); pass model_spec="):
        retrofit.save(gm, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    path = retrofit.save(gm, tmp_path / "m.safetensors", model_kwargs={"num_classes": 3, "in_chans": 1})
    assert retrofit.load(path)(torch.randn(1, 1, 64, 64)).shape == (1, 3)
    with pytest.raises(OptionError, match=r"cannot build the model again \(unknown timm model 'resnet81'"):
        retrofit.save(gm, tmp_path / "n.safetensors", model_spec="resnet81")
    with pytest.raises(SaveError, match="it is on the meta device and has no weights"):
        retrofit.save(gm.to("meta"), tmp_path / "n.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_force_replaces_only_the_saves_files(tmp_path: Path) -> None:
    gm = retrofit.retrofit(retrofit.create_model("resnet18", num_classes=4), "eca", input_size=64)
    run = tmp_path / "runs"
    run.mkdir()
    (run / "results.csv").write_text("epoch,acc\n1,0.5\n")
    (run / "model.safetensors").write_bytes(b"old")
    with pytest.raises(SaveError, match="exists; not overwriting it"):
        retrofit.save(gm, run)
    retrofit.save(gm, run, force=True)
    assert sorted(p.name for p in run.iterdir()) == ["model.safetensors", "recipe.json", "results.csv"]
    assert (run / "results.csv").read_text() == "epoch,acc\n1,0.5\n"
    assert retrofit.load(str(run)) is not None  # a str path works as a Path
    (tmp_path / "x.safetensors").mkdir()
    with pytest.raises(SaveError, match="it is a folder; a save is a .safetensors file or a folder"):
        retrofit.save(gm, tmp_path / "x.safetensors", force=True)


def test_saved_files_follow_the_umask(tmp_path: Path) -> None:
    gm = retrofit.retrofit(retrofit.create_model("resnet18", num_classes=4), "eca", input_size=64)
    old = os.umask(0o022)
    try:
        retrofit.save(gm, tmp_path / "f.safetensors")
        retrofit.save(gm, tmp_path / "d")
    finally:
        os.umask(old)
    for p in (tmp_path / "f.safetensors", tmp_path / "d" / "model.safetensors", tmp_path / "d" / "recipe.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_map_location(tmp_path: Path) -> None:
    gm = retrofit.retrofit(retrofit.create_model("resnet18", num_classes=4), "eca", input_size=64)
    loaded = retrofit.load(retrofit.save(gm, tmp_path / "m.safetensors"), map_location="meta")
    assert {t.device.type for t in loaded.state_dict().values()} == {"meta"}


def test_saves_of_the_first_format_still_load(tmp_path: Path) -> None:
    from safetensors.torch import save_model

    gm = _perturbed(retrofit.retrofit(retrofit.create_model("resnet18", num_classes=4), "cbam", input_size=64))
    r = retrofit.get_recipe(gm)
    old = {"format": "retrofit/1", "model": {"spec": "resnet18", "kwargs": {"num_classes": 4}},
           "retrofit": {"rules": {"name": r.rules_name, "doc": r.rules}, "gate": None, "on_existing": None,
                        "fuse": True, "keep_class": False, "attn_args": {}, "input_size": [3, 64, 64],
                        "leaf_modules": []},
           "versions": {}, "buffers": []}
    save_model(gm, str(tmp_path / "old.safetensors"), metadata={"retrofit_recipe": json.dumps(old)})
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(gm.eval()(x), retrofit.load(tmp_path / "old.safetensors").eval()(x))
