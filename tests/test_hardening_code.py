"""No code from files, by construction: every place a file's content could reach ``eval``,
``exec``, an import, a pickle or a ``getattr`` of a name it gives (the table in
docs/saving.md), each tried with a canary that a run of the code would create.

The files are crafted from valid saves as an attacker would: a YOLO save whose recipe names
a yaml beside it (Ultralytics evals the yaml's ``activation``), the same through a Hub cache
and through the current folder, a yaml layer that is a whole model (it reads a yaml of its
own), an argument that names Ultralytics' internals, a transformers config with remote code
in a sub-config, a timm ``local-dir:`` model, a pickle in a training checkpoint, attention
and leaf-module classes of a module that runs code on import. Without trust each is refused
before anything is imported or read; with trust, an expression in a yaml is still refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
import yaml
from safetensors.torch import save_file

import retrofit
from retrofit import ModelLoadError, UntrustedCodeError
from retrofit.cli import main

from .hostile_yolo import TINY_YOLO, canary_activation, cfg_edit, recipe_edit, yaml_beside
from .hub_cache import lay_out_folder

pytest.importorskip("ultralytics")

# --------------------------------------------------------------------------- a yaml the recipe names


def test_a_yolo_save_naming_a_yaml_is_refused_without_trust(yolo_save: Path, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    save = yaml_beside(yolo_save, tmp_path / "save", canary)
    with pytest.raises(UntrustedCodeError, match=r"asks to run code: the Ultralytics model yaml 'evil.yaml', read "
                                                 r"from a file the recipe names rather than carried in it"):
        retrofit.load(save)
    assert not canary.exists()


def test_with_trust_the_yaml_in_the_save_is_read_as_data_and_its_expression_refused(yolo_save: Path,
                                                                                    tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    save = yaml_beside(yolo_save, tmp_path / "save", canary)
    with pytest.raises(ModelLoadError, match=r"ultralytics:evil.yaml: its activation .* is not an element-wise "
                                             r"torch.nn activation called with literals .*Nothing was built"):
        retrofit.load(save, trust_code=True)
    assert not canary.exists()


def test_with_trust_a_clean_yaml_in_the_save_builds(yolo_save: Path, tmp_path: Path) -> None:
    def edit(recipe: dict[str, Any]) -> None:
        cfg = recipe["model_kwargs"].pop("cfg")
        (tmp_path / "save" / "net.yaml").write_text(yaml.safe_dump(cfg))
        recipe["model"] = "ultralytics:net.yaml"

    save = recipe_edit(yolo_save, tmp_path / "save", edit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = retrofit.load(yolo_save).eval(), retrofit.load(save, trust_code=True).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(a(x)[0], b(x)[0])


def test_a_yaml_in_the_current_folder_is_never_read(yolo_save: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The save names ``evil.yaml`` but does not hold it; the current folder does."""
    canary = tmp_path / "CANARY"
    save = yaml_beside(yolo_save, tmp_path / "save", canary)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    shutil.move(save / "evil.yaml", cwd / "evil.yaml")
    monkeypatch.chdir(cwd)
    with pytest.raises(UntrustedCodeError, match="evil.yaml"):
        retrofit.load(save)
    with pytest.raises(ModelLoadError, match=r"names the Ultralytics model yaml 'evil.yaml', which is neither in the "
                                             r"save nor a yaml Ultralytics ships"):
        retrofit.load(save, trust_code=True)
    assert not canary.exists()


def test_a_yaml_outside_the_save_is_refused_even_with_trust(yolo_save: Path, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    save = yaml_beside(yolo_save, tmp_path / "save", canary)
    shutil.move(save / "evil.yaml", tmp_path / "evil.yaml")
    recipe_path = save / "recipe.json"
    recipe_path.write_text(recipe_path.read_text().replace("ultralytics:evil.yaml", "ultralytics:../evil.yaml"))
    with pytest.raises(ModelLoadError, match=r"names the Ultralytics model yaml '../evil.yaml', outside the save's "
                                             r"folder"):
        retrofit.load(save, trust_code=True)
    assert not canary.exists()


def test_the_gates_command_refuses_it(yolo_save: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    canary = tmp_path / "CANARY"
    save = yaml_beside(yolo_save, tmp_path / "save", canary)
    (tmp_path / "data" / "a").mkdir(parents=True)
    assert main(["gates", str(save), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "asks to run code" in err and len(err.strip().splitlines()) == 1
    assert not canary.exists()


def test_a_hub_save_naming_a_yaml_is_refused(yolo_save: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    canary = tmp_path / "CANARY"
    save = yaml_beside(yolo_save, tmp_path / "save", canary)
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    lay_out_folder(cache, "me/evil", save)
    with pytest.raises(UntrustedCodeError, match="evil.yaml"):
        retrofit.load("hf-hub:me/evil")
    with pytest.raises(ModelLoadError, match="its activation"):
        retrofit.load("hf-hub:me/evil", trust_code=True)
    assert not canary.exists()


def test_the_command_line_spec_reads_a_yaml_as_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A yaml the user names on the command line is still data: its expression is refused."""
    canary = tmp_path / "CANARY"
    (tmp_path / "evil.yaml").write_text(yaml.safe_dump({**TINY_YOLO, "activation": canary_activation(canary)}))
    for trust in ([], ["--trust-code"]):
        assert main([f"ultralytics:{tmp_path / 'evil.yaml'}", "--attn", "se", "--dry-run", *trust]) == 2
        assert "its activation" in capsys.readouterr().err
    assert not canary.exists()


# --------------------------------------------------------------------------- what a carried yaml may say


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(activation="nn.Linear(10**9, 10**9)"), "its activation 'nn.Linear"),
    (lambda c: c.update(activation="nn.SiLU().__class__.__init__.__globals__['os'].system('x')"), "its activation"),
    # a whole-model class as a layer reads and evals a yaml of its own
    (lambda c: c["backbone"].insert(0, [-1, 1, "DetectionModel", ["evil.yaml"]]),
     "backbone layer 0 names 'DetectionModel', which is not a layer class"),
    (lambda c: c["backbone"].__setitem__(0, [-1, 1, "Conv", ["d", 3, 2]]),
     "has the string 'd', which Ultralytics replaces by its internal variable"),
    (lambda c: c["backbone"].__setitem__(0, [-1, 1, "Conv", [[[[[[64]]]]], 3, 2]]), "nested more than 4 levels"),
    (lambda c: c["backbone"].__setitem__(0, [-1, 1, "Conv", [{"a": 1}, 3, 2]]), "a dict argument"),
])
def test_a_carried_yaml_holds_plain_layers_only(yolo_save: Path, tmp_path: Path, edit: Any, message: str) -> None:
    save = cfg_edit(yolo_save, tmp_path / "save", edit)
    for trust in (False, True):
        error = UntrustedCodeError if not trust else ModelLoadError
        with pytest.raises(error, match=re.escape(message)):
            retrofit.load(save, trust_code=trust)


def test_a_layer_added_to_ultralytics_namespace_needs_trust(yolo_save: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The users' way of adding a layer (assigning it into Ultralytics' tasks module): a yaml
    from a file may name it only with trust."""
    from ultralytics.nn import tasks

    class Extra(torch.nn.Identity):
        pass

    monkeypatch.setattr(tasks, "Extra", Extra, raising=False)
    save = cfg_edit(yolo_save, tmp_path / "save", lambda c: c["backbone"].insert(4, [-1, 1, "Extra", []]))
    with pytest.raises(UntrustedCodeError, match="names 'Extra', which is not a layer class"):
        retrofit.load(save)
    # with trust it builds, and the save's weights (of a model without the layer) do not fit it
    with pytest.raises(ModelLoadError, match="does not match its own recipe"):
        retrofit.load(save, trust_code=True)


# --------------------------------------------------------------------------- the other adapters and entry points


def test_a_transformers_sub_config_naming_remote_code_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    recipe = {"model": "transformers:ResNetForImageClassification",
              "model_kwargs": {"config": {"model_type": "resnet", "backbone_config": {"auto_map": {"AutoModel":
                                                                                                 "evil.Model"}}}}}
    found = retrofit.Recipe.from_dict(recipe).foreign_code()
    assert found == ["the remote code its transformers config names (auto_map)"]


def test_a_transformers_recipe_reads_no_config_outside_the_save(tmp_path: Path) -> None:
    """The recipe names a folder outside the save whose config.json is 3 GiB (sparse): refused
    before a byte of it is read; one inside the save over Limits.json_bytes is refused at its size."""
    pytest.importorskip("transformers")
    outside = tmp_path / "outside"
    outside.mkdir()
    with (outside / "config.json").open("wb") as f:
        f.truncate(3 << 30)
    save = tmp_path / "save"
    save.mkdir()
    header = {"format": "retrofit/2", "recipe": {"model": "transformers:../outside", "model_kwargs": {},
                                                 "rules": None}, "versions": {}, "buffers": []}
    (save / "recipe.json").write_text(json.dumps(header))
    save_file({"w": torch.zeros(1)}, str(save / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"names the transformers config '../outside/config.json', outside the "
                                             r"save's folder"):
        retrofit.load(save)
    inside = save / "inside"
    inside.mkdir()
    with (inside / "config.json").open("wb") as f:
        f.truncate(3 << 30)
    (save / "recipe.json").write_text(json.dumps(header).replace("../outside", "inside"))
    with pytest.raises(ModelLoadError, match=r"3072.0 MiB, over the limit of 16.0 MiB \(Limits.json_bytes\)"):
        retrofit.load(save)


def test_a_timm_local_dir_model_needs_trust() -> None:
    found = retrofit.Recipe.from_dict({"model": "local-dir:/etc", "model_kwargs": {}}).foreign_code()
    assert found == ["the timm model folder 'local-dir:/etc', whose config.json timm would read from this machine"]


class _Canary:
    """Unpickling this touches a file: what a pickle in a checkpoint could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_in_a_training_checkpoint_does_not_run(tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    torch.save({"format": "retrofit-train/2", "recipe": None, "model": {}, "x": _Canary(str(canary))},
               tmp_path / "best.pt")
    with pytest.raises(ModelLoadError, match=r"cannot read training checkpoint .*best.pt"):
        retrofit.load(tmp_path / "best.pt")
    assert not canary.exists()


@pytest.mark.parametrize("field", ["attn", "leaf"])
def test_classes_of_a_module_that_runs_code_on_import_need_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 field: str) -> None:
    canary = tmp_path / "CANARY"
    (tmp_path / "evil_module_for_retrofit.py").write_text(
        f"import pathlib\npathlib.Path({str(canary)!r}).touch()\nimport torch\nclass Gate(torch.nn.Identity): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gm = retrofit.retrofit(retrofit.create_model("test_resnet", num_classes=4), "se", input_size=32)
    save = retrofit.save(gm, tmp_path / "save")
    header = json.loads((save / "recipe.json").read_text())
    if field == "attn":
        header["recipe"]["rules"]["rule"][0]["attn"] = "evil_module_for_retrofit:Gate"
    else:
        header["recipe"]["leaf_modules"] = ["evil_module_for_retrofit:Gate"]
    (save / "recipe.json").write_text(json.dumps(header))
    with pytest.raises(UntrustedCodeError, match="evil_module_for_retrofit:Gate"):
        retrofit.load(save)
    assert not canary.exists()


def test_timm_folders_named_inside_library_configs_need_trust() -> None:
    """smp's "tu-" encoders and transformers' timm backbones are built by timm.create_model,
    which reads the config.json of a ``local-dir:`` folder."""
    smp = retrofit.Recipe.from_dict({"model": "smp:Unet", "model_kwargs": {"encoder_name": "tu-local-dir:/etc"}})
    assert smp.foreign_code() == ["the encoder 'tu-local-dir:/etc', a timm model folder read from this machine"]
    hf = retrofit.Recipe.from_dict({"model": "transformers:UperNetForSemanticSegmentation", "model_kwargs": {
        "config": {"backbone_config": {"backbone": "local-dir:/etc", "use_timm_backbone": True}}}})
    assert hf.foreign_code() == ["the remote code its transformers config names (a timm model folder "
                                 "'local-dir:/etc')"]


def test_every_yaml_ultralytics_ships_passes_the_allow_list() -> None:
    """The allow-list refuses expressions, not models: each of Ultralytics' own yamls, read by
    retrofit's bounded reader as a shipped name, is plain data."""
    import ultralytics

    from retrofit.frameworks.ultralytics._adapter import _yaml_cfg, layer_problems

    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    yamls = sorted(root.rglob("*.yaml"))
    assert len(yamls) > 40
    assert {p.name: layer_problems(_yaml_cfg(p, p.name)) for p in yamls} == {p.name: [] for p in yamls}
