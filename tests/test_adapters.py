"""The framework adapters' one contract, as the command line, the saves and the Ultralytics
trainer use it: the class a model was built with, each library's config key and own file
format, the Ultralytics checkpoint's layout, and a resume that refuses other options."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("YOLO_OFFLINE", "1")

import pytest
import timm
import torch
from torch import nn

import retrofit
import retrofit.saving
from retrofit.cli import main as cli_main
from retrofit.errors import ModelLoadError, OptionError
from retrofit.frameworks import Framework, framework_of, registered_frameworks
from retrofit.meta import original_class
from retrofit.options import RetrofitOptions
from retrofit.rulefile import resolve_rules
from retrofit.saving import save_training_state


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_Block(), _Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


def test_the_original_class_is_found_through_every_form_of_result() -> None:
    model = _Net()
    assert original_class(model) is _Net
    whole = retrofit.retrofit(model, "se", input_size=16)
    assert isinstance(whole, torch.fx.GraphModule) and original_class(whole) is _Net
    kept = retrofit.retrofit(model, "se", input_size=16, keep_class=True)
    block = kept.blocks[0]
    assert type(block) is not _Block and isinstance(block, _Block) and original_class(block) is _Block
    assert original_class(retrofit.retrofit(whole, "eca", input_size=16, on_existing="stack")) is _Net


def test_each_config_key_is_declared_once_by_its_adapter() -> None:
    declared = [(f.config_file, f.config_key) for f in registered_frameworks() if f.config_key]
    assert sorted(declared) == [("config.json", "_retrofit"), ("config.json", "retrofit")]
    assert {f.prefix for f in registered_frameworks()} == {"smp", "transformers", "ultralytics"}
    assert [f.prefix for f in registered_frameworks() if f.native_suffix] == ["ultralytics"]
    assert all(f.traces_in_parts == (f.prefix != "smp") for f in registered_frameworks())


def test_an_adapter_without_a_format_of_its_own_says_so() -> None:
    with pytest.raises(OptionError, match=r"have no file format of their own here; save with retrofit.save"):
        Framework().save_native(nn.Linear(1, 1), "x.pt")


def test_a_native_file_name_for_another_library_is_one_line(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["resnet18", "--input-size", "32", "--out", str(tmp_path / "m.pt"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err == (f"retrofit: error: --out '{tmp_path / 'm.pt'}': a .pt file is an Ultralytics checkpoint, for "
                   "ultralytics models; save other models to NAME.safetensors or a folder\n")
    assert not (tmp_path / "m.pt").exists()


def test_diff_reads_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    gm = retrofit.retrofit(timm.create_model("resnet18", num_classes=4), "se", input_size=32)
    path = save_training_state(tmp_path / "last.pt", {"recipe": retrofit.get_recipe(gm).to_dict(), "versions": {},
                                                      "buffers": [], "model": gm.state_dict()})
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    assert cli_main(["diff", str(path), str(path), "--format", "json"]) == 0
    assert len(loads) == 2  # one per argument
    assert '"delta": 0' in capsys.readouterr().out
    save = retrofit.save(gm, tmp_path / "m.safetensors")
    headers = []
    real_header = retrofit.saving.read_safetensors_header
    monkeypatch.setattr(retrofit.saving, "read_safetensors_header",
                        lambda *a, **k: headers.append(a) or real_header(*a, **k))
    assert cli_main(["diff", str(path), str(save), "--format", "json"]) == 0
    assert len(headers) == 1 and len(loads) == 3
    assert '"delta": 0' in capsys.readouterr().out


@pytest.fixture(scope="module")
def yolo() -> nn.Module:
    torch.manual_seed(0)
    return retrofit.create_model("ultralytics:yolov8n.yaml", nc=3)


def test_the_ultralytics_checkpoint_is_one_record(yolo: nn.Module, tmp_path: Path) -> None:
    from retrofit.frameworks.ultralytics.checkpoint import UltralyticsCheckpoint

    framework = framework_of(yolo)
    assert framework is not None and framework.native_suffix == ".pt"
    path = framework.save_native(yolo, tmp_path / "y.pt")
    content = torch.load(path, weights_only=False)
    ckpt = UltralyticsCheckpoint.from_dict(content, str(path))
    assert set(content) == {"model", "train_args", "date", "version", "epoch", "best_fitness", "ema", "updates",
                            "optimizer"}
    assert ckpt.epoch == -1 and ckpt.ema is None and ckpt.model.yaml == yolo.yaml
    assert next(ckpt.model.parameters()).dtype == torch.float16
    assert ckpt.to_dict().keys() == content.keys()
    with pytest.raises(ModelLoadError, match=r"y.pt: the Ultralytics checkpoint lacks 'train_args', 'date'"):
        UltralyticsCheckpoint.from_dict({k: content[k] for k in ("model", "version", "epoch", "best_fitness", "ema",
                                                                 "updates", "optimizer")}, str(path))
    with pytest.raises(ModelLoadError, match=r"the Ultralytics checkpoint's 'epoch' is a str"):
        UltralyticsCheckpoint.from_dict({**content, "epoch": "3"}, str(path))


def test_a_resume_with_other_options_is_refused_naming_them(yolo: nn.Module) -> None:
    """The trainer rebuilds a retrofitted checkpoint's attention; when its own options differ
    in anything, a resumed run stops and says what differs, a new run inserts its own."""
    from retrofit.frameworks.ultralytics.training import RetrofitTrainer

    saved = retrofit.get_recipe(retrofit.retrofit(yolo, "cbam", input_size=64))

    def insert(resume: bool, **options: object) -> str:
        trainer = SimpleNamespace(retrofit_rules=resolve_rules("cbam", None), retrofit_check_identity=True,
                                  args=SimpleNamespace(resume=resume))
        model = retrofit.create_model("ultralytics:yolov8n.yaml", nc=3)
        return RetrofitTrainer._insert(trainer, model, saved, RetrofitOptions(input_size=64, **options))[1]

    assert insert(True) == "rebuilt from the checkpoint"
    with pytest.raises(OptionError, match=r"cannot resume this run with another attention: the trainer differs from "
                                          r"the run's in leaf_modules \(\(\) in the checkpoint, \('model.9',\) here\); "
                                          r"fuse \(True in the checkpoint, False here\)\. Resume with the trainer"):
        insert(True, fuse=False, leaf_modules=("model.9",))
    assert insert(False, fuse=False) == "inserted"


def test_the_trainer_takes_an_options_record_and_refuses_what_it_sets() -> None:
    import retrofit.ultralytics

    factory = retrofit.ultralytics.trainer("cbam", options=RetrofitOptions(fuse=False), gate="sigmoid")
    assert factory.for_task("detect").retrofit_options == RetrofitOptions(fuse=False, gate="sigmoid")
    assert factory.for_task("detect").__module__ == "retrofit.ultralytics"
    with pytest.raises(OptionError, match=r"trainer sets input_size, keep_class itself; leave them out"):
        retrofit.ultralytics.trainer("se", input_size=64, keep_class=True)
    with pytest.raises(OptionError, match=r"trainer sets inplace itself"):
        retrofit.ultralytics.trainer("se", inplace=True)
    with pytest.raises(OptionError, match=r"unknown option\(s\) 'fuze'"):
        retrofit.ultralytics.trainer("se", fuze=False)
