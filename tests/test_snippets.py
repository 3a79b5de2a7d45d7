"""Every documented snippet runs: the ```python blocks of README.md and of every page under
docs/, and the ```bash blocks that start with `retrofit `, in order per page, on the
stand-ins of tests/snippets.py's one substitution table (see there).

Running them is marked `docs` (several minutes on 2 CPU cores; `pytest -m docs`, which CI
runs). The checks of the table and the marks are fast and run by default; the marks are
listed in the output (`-ra` shows each as a skip with its reason).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from . import snippets
from .snippets import ROOT, Block

# Illustrative blocks are the exception: a block is run unless there is no way to run it
# here (an upload to the Hub). More than this many marks means the pages drift from code
# that runs.
MAX_ILLUSTRATIVE = 3

ALL = {page: snippets.blocks(page) for page in snippets.pages()}
RUN = {str(p.relative_to(ROOT)): [b for b in bs if b.illustrative is None] for p, bs in ALL.items()}
MARKED = [b for bs in ALL.values() for b in bs if b.illustrative]


def test_the_pages_have_blocks_and_few_illustrative_marks() -> None:
    assert sum(len(bs) for bs in RUN.values()) >= 20 and RUN["README.md"] and RUN["docs/tutorial.md"]
    assert len(MARKED) <= MAX_ILLUSTRATIVE, [b.where for b in MARKED]
    assert [m for p in ALL for m in snippets.stray_marks(p)] == []


def test_every_substitution_is_used() -> None:
    """A rule no block needs any more is stale: the table says only what the pages need."""
    paths = {name: f"/stand-in/{name}" for name in STAND_INS}
    used: set[int] = set()
    for bs in RUN.values():
        for b in bs:
            used |= snippets.substitute(b.code, paths)[1]
    stale = [s.pattern for i, s in enumerate(snippets.SUBSTITUTIONS) if i not in used]
    assert stale == []


@pytest.mark.parametrize("block", MARKED, ids=[b.where for b in MARKED])
def test_illustrative_blocks_are_listed(block: Block) -> None:
    pytest.skip(f"illustrative, not run: {block.where}: {block.illustrative}")


# --------------------------------------------------------------------------- stand-ins


def _images(root: Path) -> Path:
    """An ImageFolder: train/ and val/, two classes of coloured squares on noise, 64x64."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for k, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = (rng.random((64, 64, 3)) * 80).astype(np.uint8)
                img[16:48, 16:48, 2 * k] = 255
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def _fit_checkpoint(work: Path, images: Path) -> Path:
    """A best.pt of retrofit.finetune.fit: timm's resnet18 narrowed, SE, one epoch."""
    import retrofit
    from retrofit.data import imagefolder_datasets
    from retrofit.finetune import FinetuneConfig, fit

    from .finetune_helpers import NARROW

    torch.manual_seed(0)
    base = retrofit.create_model("resnet18", **{**NARROW, "in_chans": 3, "num_classes": 2})
    model = retrofit.retrofit(base, "se", input_size=(3, 64, 64), verify=False)
    data = imagefolder_datasets(images, model)
    fit(model, data.train, data.val, FinetuneConfig(epochs=1, batch_size=16, progress=False, out=str(work / "fit")))
    return work / "fit" / "best.pt"


def _yolo(work: Path) -> dict[str, str]:
    import retrofit
    import retrofit.ultralytics

    from .test_ultralytics import make_data

    torch.manual_seed(0)
    pt = retrofit.ultralytics.save_checkpoint(retrofit.create_model("ultralytics:yolov8n.yaml", nc=3),
                                              work / "yolov8n.pt")
    data = make_data(work / "yolo-data", "detect")
    image = sorted((data.parent / "images" / "val").iterdir())[0]
    return {"YOLO_PT": str(pt), "YOLO_DATA": str(data), "IMAGE": str(image)}


def _transformers(work: Path) -> dict[str, str]:
    import retrofit

    resnet = retrofit.create_model("transformers:ResNetForImageClassification", num_labels=3, embedding_size=16,
                                   hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
    resnet.save_pretrained(work / "hf-resnet")
    convnext = retrofit.create_model("transformers:ConvNextForImageClassification", num_labels=5,
                                     hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1])
    convnext.save_pretrained(work / "hf-convnext")
    return {"HF_FOLDER": str(work / "hf-resnet"), "HF_CONVNEXT": str(work / "hf-convnext")}


STAND_INS = ("IMAGES", "FIT_CKPT", "RULES", "YOLO_PT", "YOLO_DATA", "IMAGE", "HF_FOLDER", "HF_CONVNEXT")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("stand-ins")
    images = _images(work / "images")
    shutil.copy(ROOT / "rules" / "se.toml", work / "my_rules.toml")
    paths = {"IMAGES": str(images), "FIT_CKPT": str(_fit_checkpoint(work, images)), "RULES": str(work / "my_rules.toml"),
             **_yolo(work), **_transformers(work)}
    assert sorted(paths) == sorted(STAND_INS)
    return paths


@pytest.mark.docs
@pytest.mark.parametrize("page", [p for p, bs in RUN.items() if bs])
def test_the_snippets_of_a_page_run(page: str, stand_ins: dict[str, str], tmp_path: Path) -> None:
    """The page's blocks, in order, in a fresh folder (one Python namespace for the page)."""
    items = RUN[page]
    code = [snippets.substitute(b.code, stand_ins)[0] for b in items]
    (tmp_path / "blocks.json").write_text(snippets.as_json(items, code))
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = str(Path(sys.executable).parent)  # the `retrofit` and `yolo` commands of this environment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), "MPLBACKEND": "Agg",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "YOLO_OFFLINE": "1",
           "YOLO_CONFIG_DIR": str(tmp_path / "yolo-config"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "snippets.py"), str(tmp_path / "blocks.json")],
                       cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, (r.stdout[-4000:] + "\n" + r.stderr[-6000:])
