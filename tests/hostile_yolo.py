"""A tiny YOLO save and the edits an attacker makes to it, for the hardening tests."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import yaml

import retrofit

# A detection model of five layers: what every YOLO yaml is made of, built in a second.
TINY_YOLO = {
    "nc": 4, "scale": "n", "scales": {"n": [0.33, 0.25, 1024]},
    "backbone": [[-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C2f", [128, True]],
                 [-1, 1, "SPPF", [256, 5]]],
    "head": [[[3], 1, "Detect", ["nc"]]],
}


def canary_activation(canary: Path) -> str:
    return f"__import__('pathlib').Path({str(canary)!r}).touch() or nn.SiLU()"


def make_yolo_save(root: Path) -> Path:
    """A folder save of the tiny YOLO with SE in ``root``; tests edit copies (the
    ``yolo_save`` fixture of conftest.py)."""
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY_YOLO))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = retrofit.create_model(f"ultralytics:{root / 'tiny.yaml'}")
        gm = retrofit.retrofit(model, "se", input_size=64)
    return retrofit.save(gm, root / "save")


def recipe_edit(save: Path, dest: Path, edit: Any) -> Path:
    """A copy of ``save`` at ``dest`` whose recipe (the innermost level) ``edit`` changed."""
    shutil.copytree(save, dest)
    header = json.loads((dest / "recipe.json").read_text())
    recipe = header["recipe"]
    while recipe.get("base"):
        recipe = recipe["base"]
    edit(recipe)
    (dest / "recipe.json").write_text(json.dumps(header))
    return dest


def yaml_beside(save: Path, dest: Path, canary: Path, name: str = "evil.yaml") -> Path:
    """The attack: the recipe names a yaml file instead of carrying its cfg, and the yaml
    beside it sets an activation that touches ``canary``."""
    def edit(recipe: dict[str, Any]) -> None:
        cfg = recipe["model_kwargs"].pop("cfg")
        cfg["activation"] = canary_activation(canary)
        cfg.pop("yaml_file", None)
        (dest / name).write_text(yaml.safe_dump(cfg))
        recipe["model"] = f"ultralytics:{name}"

    return recipe_edit(save, dest, edit)


def cfg_edit(save: Path, dest: Path, edit: Any) -> Path:
    return recipe_edit(save, dest, lambda r: edit(r["model_kwargs"]["cfg"]))
