"""Saves on the Hugging Face Hub: what push_to_hub sends, and retrofit.load("hf-hub:...")
reading it back offline from a cache laid out by the test (hub_cache.py), bit for bit and
under the trust rules of local saves.

No network: uploads go to ``huggingface_hub.HfApi``'s ``create_repo`` / ``create_commit``
replaced by recorders (the Hub's side, not ours); downloads run the real
``hf_hub_download`` with ``HF_HUB_OFFLINE`` against the laid-out cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import ModelCard
from torch import nn

import retrofit
import retrofit.cli
from retrofit import ModelLoadError, OptionError, SaveError, UntrustedCodeError
from retrofit.hub import parse_hub_name
from retrofit.publish import save_for_hub

from .hub_cache import lay_out, lay_out_folder

ROOT = Path(__file__).resolve().parents[1]
TRUST = r"trust_code=True in Python, --trust-code on the command line"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache, offline: huggingface_hub reads both settings per call."""
    path = tmp_path / "hf-cache"
    path.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return path


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """resnet18 with SE, every weight moved off its init as fine-tuning would."""
    torch.manual_seed(0)
    gm = retrofit.retrofit(retrofit.create_model("resnet18", num_classes=4), "se", input_size=64)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return gm.eval()


def _outputs(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return x, model.eval()(x)


@pytest.mark.parametrize("name,want", [
    ("hf-hub:org/name", ("org/name", None)),
    ("org/name", ("org/name", None)),
    ("hf-hub:org/re.sn-et_50@v1.0", ("org/re.sn-et_50", "v1.0")),
])
def test_hub_names(name: str, want: tuple[str, str | None]) -> None:
    assert parse_hub_name(name) == want


@pytest.mark.parametrize("name", ["hf-hub:resnet50", "hf-hub:org/name@", "hf-hub:org/../name", "hf-hub:org/a/b",
                                  "hf-hub:/name"])
def test_bad_hub_names(name: str) -> None:
    with pytest.raises(OptionError, match=rf"^'{name}' does not name a Hugging Face Hub repository; expected "
                                          r"hf-hub:ORG/NAME \(or hf-hub:ORG/NAME@REVISION for a branch, tag or "
                                          r"commit\)$"):
        retrofit.load(name)


def test_the_folder_and_its_model_card(tmp_path: Path, model: nn.Module) -> None:
    folder = save_for_hub(model, tmp_path / "up", "me/resnet18-se")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.safetensors", "recipe.json"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "torch-retrofit"
    assert card.data.tags == ["retrofit", "attention", "se"]
    assert card.data.license is None and card.data.base_model is None
    text = card.text
    assert "The timm model `resnet18`, with attention modules (se) inserted by [retrofit]" in text
    assert "The timm model `resnet18`, built with the arguments `{\"num_classes\": 4}`." in text
    assert "Rule set: built-in 'se'." in text
    assert '"at": "residual-add",\n      "attn": "se",' in text  # the rule document itself
    assert "checked when retrofit() inserted the modules" in text
    for row in ("parameters before                11,178,564", "parameters after                 11,268,676",
                "parameters added                 90,112 (+0.81%)", "sites changed / skipped / found  8 / 0 / 28",
                "max |Δoutput| at init            0 (exact identity)",
                "layer4         8,393,728       8,460,352   66,624     +0.79%"):
        assert row in text, row
    assert 'model = retrofit.load("hf-hub:me/resnet18-se")\n' in text
    assert "Loading runs no code from this repository" in text
    with pytest.raises(SaveError, match=r"'.*up' exists; not overwriting it \(pass force=True to replace its files\)"):
        save_for_hub(model, folder, "me/resnet18-se")


def test_a_loaded_model_gets_its_identity_check_from_a_fresh_build(tmp_path: Path, model: nn.Module) -> None:
    loaded = retrofit.load(retrofit.save(model, tmp_path / "m.safetensors"))
    assert retrofit.get_report(loaded).max_abs_diff is None  # a loaded model carries no check
    card = (save_for_hub(loaded, tmp_path / "up", "me/x", license="apache-2.0") / "README.md").read_text()
    assert "checked before the upload, on a fresh build of the recipe" in card
    assert "max |Δoutput| at init            0 (exact identity)" in card
    assert ModelCard(card).data.license == "apache-2.0"


def test_push_to_hub_sends_the_save_and_load_reads_it_back(tmp_path: Path, model: nn.Module, cache: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    sent: dict[str, bytes] = {}

    def create_repo(self: Any, repo_id: str, **kwargs: Any) -> str:
        calls.append(("create_repo", (repo_id, kwargs)))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self: Any, repo_id: str, operations: Any, **kwargs: Any) -> str:
        calls.append(("create_commit", (repo_id, kwargs)))
        for op in operations:  # read now: the files lie in a temporary folder
            sent[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    assert retrofit.push_to_hub(model, "me/resnet18-se", private=True) == "commit-info"
    written_by = f"Written by torch-retrofit {retrofit.__version__}."
    assert calls == [
        ("create_repo", ("me/resnet18-se", {"private": True, "exist_ok": True, "repo_type": "model"})),
        ("create_commit", ("me/resnet18-se", {"repo_type": "model", "revision": None, "create_pr": False,
                                              "commit_message": "Add retrofit save",
                                              "commit_description": written_by})),
    ]
    # exactly the folder save_for_hub writes, byte for byte
    folder = save_for_hub(model, tmp_path / "up", "me/resnet18-se")
    assert sent == {p.name: p.read_bytes() for p in folder.iterdir()}
    # ... and what a download of that commit gives back loads bit for bit
    lay_out(cache, "me/resnet18-se", sent)
    x, y = _outputs(model)
    assert torch.equal(retrofit.load("hf-hub:me/resnet18-se").eval()(x), y)


def test_push_to_hub_errors(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx2
    from huggingface_hub.utils import HfHubHTTPError

    def unauthorized(self: Any, repo_id: str, **kwargs: Any) -> None:
        url = "https://huggingface.co/api/repos/create"
        raise HfHubHTTPError(f"401 Client Error: Unauthorized for url: {url}",
                             response=httpx2.Response(401, request=httpx2.Request("POST", url)))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unauthorized)
    with pytest.raises(SaveError, match=r"^cannot upload to the Hugging Face Hub repository 'me/x' \(HfHubHTTPError: "
                                        r"401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/"
                                        r"create\); log in with `hf auth login` or pass token=... with write access$"):
        retrofit.push_to_hub(model, "hf-hub:me/x")
    with pytest.raises(OptionError, match=r"^push_to_hub takes a repository id without a revision, not 'v1' in it; "
                                          r"pass revision='v1' to commit to that branch$"):
        retrofit.push_to_hub(model, "me/x@v1")
    # a model that cannot be saved fails before anything is sent
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda *a, **k: pytest.fail("contacted the Hub"))
    with pytest.raises(OptionError, match=r"^ResNet did not come from retrofit\(\)"):
        retrofit.push_to_hub(timm.create_model("resnet18"), "me/x")


def test_a_fresh_process_loads_it_with_hf_hub_offline(tmp_path: Path, model: nn.Module) -> None:
    """The environment variables, read by huggingface_hub at import, as a user sets them;
    and the command line reads Hub saves too."""
    cache = tmp_path / "hf-cache"
    lay_out_folder(cache, "me/resnet18-se", save_for_hub(model, tmp_path / "up", "me/resnet18-se"))
    x, y = _outputs(model)
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    script = ("import sys, torch, retrofit\n"
              "io = torch.load(sys.argv[1])\n"
              "m = retrofit.load('hf-hub:me/resnet18-se').eval()\n"
              "with torch.no_grad():\n"
              "    print(torch.equal(m(io['x']), io['y']), m(io['x']).dtype)\n")
    # As many threads as this process computed `y` with: CPU kernels may round differently
    # with another count, and the check is bit for bit.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "io.pt")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout == "True torch.float32\n"
    local = retrofit.save(model, tmp_path / "local.safetensors")
    r = subprocess.run([sys.executable, "-m", "retrofit.cli", "diff", "hf-hub:me/resnet18-se", str(local), "--format",
                        "json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)["rows"]
    assert rows[-1] == {"module": "total", "a": 11268676, "b": 11268676, "delta": 0}


NET = ("open({sentinel!r}, 'a').write('imported\\n')\n"
       "import timm\n"
       "def build(num_classes=10):\n"
       "    return timm.create_model('resnet18', num_classes=num_classes)\n")


def test_a_model_file_on_the_hub_needs_trust_exactly_as_a_local_one(tmp_path: Path, cache: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    sentinel = tmp_path / "imported"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "net.py").write_text(NET.format(sentinel=str(sentinel)))
    torch.manual_seed(0)
    gm = retrofit.retrofit(retrofit.create_model(f"{tmp_path / 'src' / 'net.py'}:build", num_classes=3), "eca",
                           input_size=64)
    folder = save_for_hub(gm, tmp_path / "up", "me/net")
    sentinel.unlink()  # building the model above imported the file
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.safetensors", "net.py", "recipe.json"]
    recipe = json.loads((folder / "recipe.json").read_text())["recipe"]
    digest = hashlib.sha256((folder / "net.py").read_bytes()).hexdigest()
    assert (recipe["model"], recipe["model_sha256"]) == ("net.py:build", digest)  # beside recipe.json, with its hash
    card = (folder / "README.md").read_text()
    assert "model = retrofit.load(\"hf-hub:me/net\", trust_code=True)" in card
    assert f"- `net.py`: the model file (sha256 `{digest}`)" in card
    assert "Building this model runs code from this repository: the model file 'net.py'" in card
    lay_out_folder(cache, "me/net", folder)

    with pytest.raises(UntrustedCodeError) as local:
        retrofit.load(str(folder))
    with pytest.raises(UntrustedCodeError, match=rf"^hf-hub:me/net asks to run code: the model file 'net.py' \(its "
                                                 rf"function 'build' builds the model\)\. Nothing was imported; "
                                                 rf"load it only if you trust where it came from: {TRUST}$") as hub:
        retrofit.load("hf-hub:me/net")
    assert str(hub.value) == str(local.value).replace(str(folder), "hf-hub:me/net")
    assert retrofit.cli.main(["gates", "hf-hub:me/net", "--data", str(tmp_path), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retrofit gates: error: hf-hub:me/net asks to run code: the model file 'net.py'")
    assert not sentinel.exists() and "net" not in sys.modules

    # with trust: the file from the same commit of the repository, bit for bit
    x, y = _outputs(gm)
    assert torch.equal(retrofit.load("hf-hub:me/net", trust_code=True).eval()(x), y)
    assert sentinel.read_text() == "imported\n"
    # a file in the cache that is not the one saved is refused, as beside a local save
    blob = (cache / "models--me--net" / "snapshots").glob("*/net.py").__next__().resolve()
    old = digest
    blob.write_text(NET.format(sentinel=str(sentinel)) + "# changed\n")
    new = hashlib.sha256(blob.read_bytes()).hexdigest()
    with pytest.raises(ModelLoadError, match=rf"model file '.*/net.py' is not the file this model was saved with "
                                             rf"\(sha256 {new} now, {old} when saved\); not running it"):
        retrofit.load("hf-hub:me/net", trust_code=True)
    assert sentinel.read_text() == "imported\n"


def test_a_model_file_outside_the_repository_is_not_fetched(tmp_path: Path, model: nn.Module, cache: Path) -> None:
    folder = save_for_hub(model, tmp_path / "up", "me/x")
    header = json.loads((folder / "recipe.json").read_text())
    header["recipe"]["model"] = "../../../net.py:build"
    (folder / "recipe.json").write_text(json.dumps(header))
    lay_out_folder(cache, "me/x", folder)
    with pytest.raises(ModelLoadError, match=r"^hf-hub:me/x: its recipe names the model file '../../../net.py', "
                                             r"outside the repository; a save on the Hub carries its model file "
                                             r"beside recipe.json. Not fetching it$"):
        retrofit.load("hf-hub:me/x", trust_code=True)


def test_a_timm_repository_is_not_a_retrofit_save(cache: Path) -> None:
    """What huggingface_hub leaves after asking the Hub for a file it lacks (.no_exist)."""
    lay_out(cache, "timm/resnet18.a1_in1k", {"config.json": b"{}", "model.safetensors": b"..."},
            absent=["recipe.json"])
    with pytest.raises(ModelLoadError, match=r"^hf-hub:timm/resnet18.a1_in1k is not a retrofit save: the repository "
                                             r"has no recipe.json. A timm model on the Hub is a base model: "
                                             r"retrofit.create_model\('hf-hub:timm/resnet18.a1_in1k'\), or `retrofit "
                                             r"hf-hub:timm/resnet18.a1_in1k --attn se` on the command line$"):
        retrofit.load("hf-hub:timm/resnet18.a1_in1k")


def test_offline_and_not_in_the_cache(cache: Path) -> None:
    with pytest.raises(ModelLoadError, match=rf"^hf-hub:me/missing: recipe.json is not in the Hugging Face cache "
                                             rf"\({cache}\) and the Hub cannot be reached \(HF_HUB_OFFLINE is set\); "
                                             rf"load it once with the network, or point HF_HUB_CACHE at a cache that "
                                             rf"holds it$"):
        retrofit.load("hf-hub:me/missing")


def test_an_incomplete_save(tmp_path: Path, model: nn.Module, cache: Path) -> None:
    folder = save_for_hub(model, tmp_path / "up", "me/x")
    lay_out(cache, "me/x", {"recipe.json": (folder / "recipe.json").read_bytes()}, absent=["model.safetensors"])
    with pytest.raises(ModelLoadError, match=r"^hf-hub:me/x: the repository has no model.safetensors, which its "
                                             r"recipe.json needs; the save is incomplete \(push it again with "
                                             r"retrofit.push_to_hub\)$"):
        retrofit.load("hf-hub:me/x")


def test_revisions(tmp_path: Path, model: nn.Module, cache: Path) -> None:
    commit = lay_out_folder(cache, "me/x", save_for_hub(model, tmp_path / "up", "me/x"), refs=["main", "v1"])
    x, y = _outputs(model)
    for name in ("hf-hub:me/x@v1", f"hf-hub:me/x@{commit}"):
        assert torch.equal(retrofit.load(name).eval()(x), y), name
    with pytest.raises(ModelLoadError, match=r"^hf-hub:me/x@v2: recipe.json is not in the Hugging Face cache"):
        retrofit.load("hf-hub:me/x@v2")
    # a local folder whose name starts with hf-hub: is read as a folder when given as a Path
    with pytest.raises(ModelLoadError, match=r"^no saved model at 'hf-hub:me/x'"):
        retrofit.load(Path("hf-hub:me/x"))


def test_a_retrofit_save_is_not_a_base_model(tmp_path: Path, model: nn.Module, cache: Path) -> None:
    """The other hf-hub: (timm's base models) says where a retrofit save goes instead."""
    lay_out_folder(cache, "me/x", save_for_hub(model, tmp_path / "up", "me/x"), absent=["config.json"])
    with pytest.raises(ModelLoadError, match=r"^cannot build timm model 'hf-hub:me/x' \(.*\); hf-hub: models need the "
                                             r"network or the local cache \(a retrofit save on the Hub is not a base "
                                             r"model: load it with retrofit.load\('hf-hub:me/x'\)\)$"):
        retrofit.create_model("hf-hub:me/x")
