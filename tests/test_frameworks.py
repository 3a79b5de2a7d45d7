"""Models of other libraries: Ultralytics YOLO, Hugging Face transformers, segmentation_models_pytorch.

Each is built from a config (random init, nothing downloaded), retrofitted in both forms,
and checked for what users of that library rely on: the sites reached (golden lists),
exact identity, the library's own behaviour (YOLO's ``fuse()``, transformers'
``ModelOutput`` and ``loss``, smp's ``predict``), a train step, and a save that loads
again without ``trust_code``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import retrofit

YOLO_ADDS = ["model.2.m.0", "model.4.m.0", "model.4.m.1", "model.6.m.0", "model.6.m.1", "model.8.m.0"]
YOLO11_ADDS = ["model.2.m.0", "model.4.m.0", "model.6.m.0.m.0", "model.6.m.0.m.1", "model.8.m.0.m.0",
               "model.8.m.0.m.1", "model.10.m.0.attn", "model.10.m.0", "model.10.m.0", "model.13.m.0",
               "model.16.m.0", "model.19.m.0", "model.22.m.0.m.0", "model.22.m.0.m.1"]
FORMS = [False, True]


def _quiet_retrofit(model: nn.Module, *args, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "does not trace as a whole": expected for these models
        return retrofit.retrofit(model, *args, **kwargs)


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _equal_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        got, want = _leaves(a(x)), _leaves(b(x))
    return len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def _perturb(model: nn.Module, name_part: str) -> None:
    """Move the inserted modules away from identity, as fine-tuning would."""
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if name_part in n:
                p.add_(torch.randn_like(p) * 0.05)


# --------------------------------------------------------------------------- Ultralytics


@pytest.fixture(scope="module")
def yolov8n() -> nn.Module:
    return retrofit.create_model("ultralytics:yolov8n.yaml", nc=3).eval()


@pytest.mark.parametrize("keep_class", FORMS)
def test_yolo_reaches_every_bottleneck_add_and_is_exact(yolov8n: nn.Module, keep_class: bool) -> None:
    assert [s.path for s in retrofit.analyze(yolov8n, 64, keep_class=keep_class).of_kind("residual-add")] == YOLO_ADDS
    out = _quiet_retrofit(yolov8n, "se", input_size=64, keep_class=keep_class)
    report = retrofit.get_report(out)
    # The model's forward loops over its layers in Python: both forms keep its class, with
    # the Bottlenecks rewritten in place.
    assert type(out) is type(yolov8n) and report.max_abs_diff == 0.0
    assert [r.path for r in report.rows] == YOLO_ADDS and [r.kind for r in report.rows] == ["residual-add"] * 6
    assert list(report.traced) == YOLO_ADDS and report.params_added == 5_760
    assert _equal_outputs(out, yolov8n, torch.randn(2, 3, 96, 64))  # another input size: the graphs are general
    # The per-stage diff is per YOLO layer: Bottleneck adds sit in layers 2, 4, 6, 8.
    added = {s.name: s.params_added for s in report.stages if s.params_added}
    assert added == {"model.2": 280, "model.4": 1_104, "model.6": 2_192, "model.8": 2_184}


def test_yolo11_reaches_c3k2_and_psa_blocks() -> None:
    model = retrofit.create_model("ultralytics:yolo11n.yaml", nc=3)
    assert [s.path for s in retrofit.analyze(model, 64).of_kind("residual-add")] == YOLO11_ADDS


def test_yolo_fuse_fuses_every_batchnorm(yolov8n: nn.Module) -> None:
    out = _quiet_retrofit(yolov8n, "cbam", input_size=64)
    _perturb(out, ".cbam.")
    x = torch.randn(1, 3, 64, 64)
    out.eval()
    with torch.no_grad():
        unfused = _leaves(out(x))
    # No Conv is inlined into a rewritten block: each stays a Conv that fuse() can fold.
    assert retrofit.get_report(out).inlined == ()
    fused = copy.deepcopy(out).fuse(verbose=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        got = _leaves(fused(x))
    assert all(torch.allclose(g, u, atol=1e-4, rtol=1e-4) for g, u in zip(got, unfused, strict=True))
    # At init the fused retrofit is the fused original, bit for bit.
    fresh = _quiet_retrofit(yolov8n, "se", input_size=64).fuse(verbose=False)
    assert _equal_outputs(fresh, copy.deepcopy(yolov8n).fuse(verbose=False), x)


def test_yolo_train_step_reaches_the_attention(yolov8n: nn.Module) -> None:
    from ultralytics.cfg import get_cfg

    out = _quiet_retrofit(yolov8n, "cbam", input_size=64)
    out.args = get_cfg()  # the loss reads its gains from the training arguments
    out.train()
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [2.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.6, 0.2, 0.4]])}
    loss, _ = out.loss(batch)
    loss.sum().backward()
    grads = [p.grad for n, p in out.named_parameters() if ".cbam." in n]
    assert len(grads) == 24 and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("keep_class", FORMS)
def test_yolo_save_holds_no_code_and_loads_without_trust(yolov8n: nn.Module, keep_class: bool,
                                                         tmp_path: Path) -> None:
    out = _quiet_retrofit(yolov8n, "eca", input_size=64, keep_class=keep_class)
    _perturb(out, ".eca.")
    retrofit.save(out, tmp_path / "yolo")
    recipe = json.loads((tmp_path / "yolo" / "recipe.json").read_text())["recipe"]
    assert recipe["model"] == "ultralytics:yolov8n.yaml" and recipe["model_kwargs"]["model_class"] == "DetectionModel"
    assert retrofit.Recipe.from_dict(recipe).foreign_code() == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = retrofit.load(tmp_path / "yolo")
    assert _equal_outputs(back, out, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("field,value,what", [
    ("activation", "__import__('pathlib').Path('CANARY').touch() or nn.SiLU()", "activation"),
    ("layer", "torch_safe_load", "not a layer class of Ultralytics, torch.nn or torchvision.ops"),
])
def test_a_yolo_yaml_that_runs_code_is_refused(yolov8n: nn.Module, tmp_path: Path, monkeypatch, field: str,
                                               value: str, what: str) -> None:
    out = _quiet_retrofit(yolov8n, "se", input_size=64)
    retrofit.save(out, tmp_path / "yolo")
    path = tmp_path / "yolo" / "recipe.json"
    header = json.loads(path.read_text())
    cfg = header["recipe"]["base"]["model_kwargs"]["cfg"] if header["recipe"].get("base") else \
        header["recipe"]["model_kwargs"]["cfg"]
    if field == "activation":
        cfg["activation"] = value
    else:
        cfg["backbone"][0][2] = value
    path.write_text(json.dumps(header))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(retrofit.UntrustedCodeError, match=what):
        retrofit.load(tmp_path / "yolo")
    assert not (tmp_path / "CANARY").exists()


@pytest.mark.parametrize("nc,message", [
    (81, r"/yolo': its recipe builds tensor 'model.22.cv3.0.0.conv.weight' of shape \[81, 64, 3, 3\], its weights "
         r"hold \[64, 64, 3, 3\]; the file does not match its own recipe .*nothing was built$"),
    (5_000_000, r"^ultralytics:yolov8n.yaml: 5000000 classes \(nc\) is over the limit of 1000000 \(Limits.classes\); "
                r"nothing was built$"),
])
def test_an_edited_yolo_recipe_is_refused_before_it_is_built(yolov8n: nn.Module, tmp_path: Path, nc: int,
                                                             message: str) -> None:
    """Ultralytics models build on the meta device too, so an edited class count is compared
    with the weights file's header before anything real is allocated; a count whose names
    alone would take gigabytes is over Limits.classes."""
    out = _quiet_retrofit(yolov8n, "se", input_size=64)
    retrofit.save(out, tmp_path / "yolo")
    path = tmp_path / "yolo" / "recipe.json"
    header = json.loads(path.read_text())
    (header["recipe"].get("base") or header["recipe"])["model_kwargs"]["cfg"]["nc"] = nc
    path.write_text(json.dumps(header))
    built: list[str] = []
    from ultralytics.nn.modules import Detect

    original = Detect.__init__

    def spy(self: nn.Module, *args: object, **kwargs: object) -> None:
        built.append(str(torch.get_default_device()))
        original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Detect, "__init__", spy)
        with pytest.raises(retrofit.ModelLoadError, match=message):
            retrofit.load(tmp_path / "yolo")
    assert built == ([] if nc > 1_000_000 else ["meta"])  # never built for real


def test_a_p6_yolo_at_an_input_it_cannot_run_says_so() -> None:
    """A P6 YOLO needs a multiple of 64: the error is about the input, not about tracing."""
    model = retrofit.create_model("ultralytics:yolov8n-p6.yaml").eval()
    with pytest.raises(retrofit.TraceError, match=r"^DetectionModel does not run on a \(2, 3, 96, 96\) probe input "
                                                  r"\(Sizes of tensors must match.*\); pass an input_size it runs on"):
        retrofit.retrofit(model, "se", input_size=96)
    assert retrofit.get_report(_quiet_retrofit(model, "se", input_size=128)).max_abs_diff == 0.0


def test_a_yolo_world_save_keeps_its_class_embeddings(tmp_path: Path) -> None:
    """YOLO-World keeps its classes' text embeddings in a plain attribute (set_classes
    writes it); the save holds them and the load predicts with them, not random ones."""
    torch.manual_seed(0)
    model = retrofit.create_model("ultralytics:yolov8n-world.yaml").eval()
    model.txt_feats = torch.linspace(-1, 1, 80 * 512).reshape(1, 80, 512)  # as set_classes would
    out = _quiet_retrofit(model, "se", input_size=64)
    retrofit.save(out, tmp_path / "world")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = retrofit.load(tmp_path / "world")
    assert torch.equal(back.txt_feats, model.txt_feats) and "txt_feats" in dict(back.named_buffers())
    assert _equal_outputs(back, out, torch.randn(1, 3, 64, 64))


def test_a_yolo_checkpoint_spec_needs_trust(tmp_path: Path) -> None:
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(retrofit.UntrustedCodeError, match="pickle"):
        retrofit.create_model(f"ultralytics:{ckpt}")


def test_yolo_command_line_prints_the_diff_per_layer(capsys) -> None:
    from retrofit.cli import main

    assert main(["ultralytics:yolov8n.yaml", "--input-size", "64", "-q", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_diff"] == 0.0 and report["sites_changed"] == 6
    assert [s["name"] for s in report["stages"]][:3] == ["model.0", "model.1", "model.2"]


# --------------------------------------------------------------------------- transformers


def _tiny_hf(name: str) -> nn.Module:
    sizes = {"ResNetForImageClassification": dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                                  depths=[1, 1, 1, 1]),
             "ConvNextForImageClassification": dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1]),
             # every conv in a TF-padding layer whose forward does not trace: each layer,
             # called whole, is a conv block (its default dropout, 0.999, would leave no gradient)
             "MobileNetV1ForImageClassification": dict(depth_multiplier=0.25, classifier_dropout_prob=0.0)}[name]
    return retrofit.create_model(f"transformers:{name}", num_labels=3, **sizes).eval()


HF_SITES = {"ResNetForImageClassification": ["resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0",
                                             "resnet.encoder.stages.2.layers.0", "resnet.encoder.stages.3.layers.0"],
            "ConvNextForImageClassification": ["convnext.encoder.stages.0.layers.0",
                                               "convnext.encoder.stages.1.layers.0",
                                               "convnext.encoder.stages.2.layers.0",
                                               "convnext.encoder.stages.2.layers.1",
                                               "convnext.encoder.stages.3.layers.0"],
            "MobileNetV1ForImageClassification": ["mobilenet_v1.conv_stem",
                                                  *(f"mobilenet_v1.layer.{i}" for i in range(26))]}


@pytest.mark.parametrize("name", sorted(HF_SITES))
@pytest.mark.parametrize("keep_class", FORMS)
def test_transformers_model_output_loss_and_train_step(name: str, keep_class: bool) -> None:
    model = _tiny_hf(name)
    out = _quiet_retrofit(model, "se", input_size=64, keep_class=keep_class)
    report = retrofit.get_report(out)
    assert [r.path for r in report.rows] == HF_SITES[name] and report.max_abs_diff == 0.0
    assert type(out) is type(model)
    x, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    with torch.no_grad():
        want, got = model(x, labels=labels), out.eval()(x, labels=labels)
    assert type(got) is type(want) and torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    out.train()
    out(x, labels=labels).loss.backward()
    inserted = [p for n, p in out.named_parameters() if any(n.startswith(f"{r.module}.") for r in report.rows)]
    assert inserted and any(p.grad is not None and p.grad.abs().sum() > 0 for p in inserted)


def test_transformers_save_and_save_pretrained_bring_the_attention_back(tmp_path: Path) -> None:
    import transformers

    out = _quiet_retrofit(_tiny_hf("ResNetForImageClassification"), "cbam", input_size=64)
    _perturb(out, ".cbam.")
    x = torch.randn(2, 3, 64, 64)
    retrofit.save(out, tmp_path / "save")
    assert retrofit.Recipe.from_dict(json.loads((tmp_path / "save" / "recipe.json").read_text())["recipe"]) \
        .foreign_code() == []
    assert _equal_outputs(retrofit.load(tmp_path / "save"), out, x)
    # The library's own save: its config.json carries the recipe, and retrofit.load reads
    # the folder with its attention; the plain class's from_pretrained drops it.
    out.save_pretrained(tmp_path / "hf")
    assert "retrofit" in json.loads((tmp_path / "hf" / "config.json").read_text())
    assert _equal_outputs(retrofit.load(tmp_path / "hf"), out, x)
    plain = transformers.ResNetForImageClassification.from_pretrained(tmp_path / "hf")
    assert not _equal_outputs(plain, out, x)


def test_a_transformers_model_that_needs_another_package_says_which(capsys: pytest.CaptureFixture[str]) -> None:
    """Dinat needs natten, which the test extra does not install: one line, exit 2."""
    import importlib.util

    from retrofit.cli import main

    if importlib.util.find_spec("natten") is not None:
        pytest.skip("natten is installed here")
    assert main(["transformers:DinatForImageClassification", "--attn", "se"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retrofit: error: cannot build transformers:DinatForImageClassification: "
                          "DinatForImageClassification requires the natten library") and len(err.splitlines()) == 1


def test_a_transformers_config_that_names_remote_code_is_refused(tmp_path: Path) -> None:
    out = _quiet_retrofit(_tiny_hf("ResNetForImageClassification"), "se", input_size=64)
    retrofit.save(out, tmp_path / "save")
    path = tmp_path / "save" / "recipe.json"
    header = json.loads(path.read_text())
    header["recipe"]["model_kwargs"]["config"]["auto_map"] = {"AutoModel": "evil.EvilModel"}
    path.write_text(json.dumps(header))
    with pytest.raises(retrofit.UntrustedCodeError, match="remote code"):
        retrofit.load(tmp_path / "save")


# --------------------------------------------------------------------------- smp


@pytest.mark.parametrize("keep_class", FORMS)
def test_smp_unet_predict_train_step_and_round_trip(keep_class: bool, tmp_path: Path) -> None:
    model = retrofit.create_model("smp:Unet", encoder_name="resnet18", classes=2).eval()
    out = _quiet_retrofit(model, "se", input_size=64, keep_class=keep_class)
    report = retrofit.get_report(out)
    assert [r.path for r in report.rows] == [f"encoder.layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert report.max_abs_diff == 0.0
    x = torch.randn(2, 3, 64, 64)
    if keep_class:
        assert type(out) is type(model) and torch.equal(out.predict(x), model.predict(x))
    else:  # smp's Unet traces whole: a GraphModule, which says how to keep methods such as predict
        assert isinstance(out, torch.fx.GraphModule) and torch.equal(out(x), model(x))
        with pytest.raises(AttributeError, match="keep_class=True"):
            out.predict(x)
    out.train()
    out(x).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in out.named_parameters() if ".se." in n)
    _perturb(out, ".se.")
    retrofit.save(out, tmp_path / "unet")
    assert _equal_outputs(retrofit.load(tmp_path / "unet"), out, x)


# --------------------------------------------------------------------------- the package


def test_import_retrofit_imports_no_framework() -> None:
    code = ("import sys, retrofit; print(sorted(m for m in ('ultralytics', 'transformers', "
            "'segmentation_models_pytorch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("spec,kwargs,title", [
    ("ultralytics:yolov8n.yaml", {"nc": 3}, "The Ultralytics model `yolov8n.yaml` (DetectionModel)"),
    ("smp:Unet", {"encoder_name": "resnet18", "classes": 2}, "The segmentation-models-pytorch model `Unet`"),
])
def test_a_hub_save_of_a_framework_model_loads_without_trust(spec: str, kwargs: dict, title: str, tmp_path: Path,
                                                            monkeypatch) -> None:
    import huggingface_hub

    from retrofit.publish import save_for_hub

    from .hub_cache import lay_out_folder

    out = _quiet_retrofit(retrofit.create_model(spec, **kwargs), "se", input_size=64, keep_class=True)
    _perturb(out, ".se.")
    folder = save_for_hub(out, tmp_path / "up", "me/x")
    card = (folder / "README.md").read_text()
    assert title in card and "Loading runs no code from this repository" in card
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    lay_out_folder(tmp_path / "cache", "me/x", folder)
    assert _equal_outputs(retrofit.load("hf-hub:me/x"), out, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("spec", ["ultralytics:yolov8n.yaml", "transformers:ResNetForImageClassification"])
def test_the_normal_path_of_a_framework_model_is_quiet(spec: str, caplog: pytest.LogCaptureFixture) -> None:
    """A YOLO or transformers model does not trace as a whole, as expected: no warning, one
    short INFO line (shown by `retrofit -v`), the details in report.left_alone."""
    import logging

    model = (retrofit.create_model(spec, nc=3) if spec.startswith("ultralytics") else _tiny_hf(spec.partition(":")[2]))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="retrofit"):
        warnings.simplefilter("always")
        out = retrofit.retrofit(model, "se", input_size=64)
    assert [str(w.message) for w in caught] == []
    lines = [r.getMessage() for r in caplog.records if r.name == "retrofit"]
    assert len(lines) == 1 and len(lines[0]) <= 120 and "traced submodule" in lines[0], lines
    report = retrofit.get_report(out)
    assert report.left_alone[0][0] == "" and report.left_alone[0][1]  # the top-level forward, and why
    assert not any("does not trace" in w for w in report.warnings)
