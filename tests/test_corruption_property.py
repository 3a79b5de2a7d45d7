"""Property: a corrupted save loads or fails with a RetrofitError, never anything else.

A valid small save (a ``.safetensors`` file, a folder, a training checkpoint) gets random
damage: bytes flipped (mostly in the header, where they matter), the file truncated, or a
field of its recipe deleted, retyped, or nested deeply. ``retrofit.load`` in this process
must then return a model or raise a :class:`~retrofit.RetrofitError`, and ``retrofit diff``
must exit 0 or 2; no other exception, and no hang (each example has a deadline).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_model
from torch import nn

import retrofit
from retrofit import RetrofitError
from retrofit.cli import main
from retrofit.saving import save_training_state

from .timeouts import Hang, deadline

SECONDS_PER_EXAMPLE = 30


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small retrofitted model, its saves in three forms, and its header as data."""
    torch.manual_seed(0)
    gm = retrofit.retrofit(retrofit.create_model("test_resnet", num_classes=3), "eca", input_size=32)
    root = tmp_path_factory.mktemp("valid")
    folder = retrofit.save(gm, root / "folder")
    header = json.loads((folder / "recipe.json").read_text())
    ckpt = save_training_state(root / "best.pt", {"recipe": header["recipe"], "model": gm.state_dict(),
                                                  "versions": header["versions"], "buffers": header["buffers"]})
    return {"model": gm, "folder": folder, "file": retrofit.save(gm, root / "m.safetensors"), "checkpoint": ckpt,
            "header": header}


# --------------------------------------------------------------------------- damage

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.sampled_from([0, -1, 10**7, 2**63, "", "se", "resnet18", "x.py:f", "../x.py:f", "cuda", [], {}]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
DEEP = "__retrofit_deep__"


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        out.append((*prefix, k))
        out += _paths(v, (*prefix, k))
    return out


@st.composite
def header_edits(draw: st.DrawFn, header: dict[str, Any], deep: tuple[int, ...] = (50, 200, 5000, 200_000)) -> str:
    """The header's JSON text with a few fields deleted, retyped or nested ``deep``."""
    header = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(header)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = header
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["delete", "retype", "retype", "deep"]))
        if op == "delete":
            del parent[path[-1]]
        elif op == "retype":
            parent[path[-1]] = draw(json_values)
        else:
            parent[path[-1]] = DEEP
    depth = draw(st.sampled_from(deep))
    return json.dumps(header).replace(json.dumps(DEEP), "[" * depth + "]" * depth)


def _header_end(data: bytes) -> int:
    return min(len(data), 8 + int.from_bytes(data[:8], "little"))


@st.composite
def damaged(draw: st.DrawFn, valid: dict[str, Any], dest: Path) -> tuple[Path, str]:
    """A copy of one of the valid saves at ``dest``, damaged; and what was done (for the report)."""
    form = draw(st.sampled_from(["file", "folder", "checkpoint"]))
    kind = draw(st.sampled_from(["fields", "fields", "fields", "digits", "digits", "flip", "truncate"]))
    src: Path = valid[form]
    path = dest / src.name
    (shutil.copytree if form == "folder" else shutil.copy)(src, path)
    if kind == "fields":
        if form == "checkpoint":  # plain data in a pickle: nested as deep as JSON reads back
            header = json.loads(draw(header_edits(valid["header"], (50, 200))))
            if not isinstance(header, dict):
                header = {"recipe": header}
            header.pop("format", None)
            save_training_state(path, {**header, "model": valid["model"].state_dict()})
            return path, f"{form}: fields -> {json.dumps(header)[:300]}"
        text = draw(header_edits(valid["header"]))
        if form == "folder":
            (path / "recipe.json").write_text(text)
        else:
            save_model(valid["model"], str(path), metadata={"retrofit_recipe": text})
        return path, f"{form}: fields -> {text[:300]}"
    target = path
    if form == "folder":
        target = path / draw(st.sampled_from(["recipe.json", "model.safetensors"]))
    data = bytearray(target.read_bytes())
    if kind == "digits" and form != "checkpoint":
        # a digit of the header changed to another: valid JSON, other numbers (shapes,
        # offsets, channel counts, the header's length)
        end = _header_end(bytes(data)) if target.suffix == ".safetensors" else len(data)
        places = [i for i in range(end) if 48 <= data[i] <= 57] or [0]
        changes = []
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.sampled_from(places))
            data[at] = ord(draw(st.sampled_from("0123456789")))
            changes.append(at)
        target.write_bytes(bytes(data))
        return path, f"{form}: {target.name} digits changed at {changes}"
    if kind == "truncate":
        cut = draw(st.integers(0, max(len(data) - 1, 0)))
        target.write_bytes(bytes(data[:cut]))
        return path, f"{form}: {target.name} truncated to {cut} of {len(data)} bytes"
    # flips, mostly where the structure is: a safetensors header, a JSON file, a zip's ends
    end = _header_end(bytes(data)) if target.suffix == ".safetensors" else len(data)
    flips = []
    for _ in range(draw(st.integers(1, 8))):
        if form == "checkpoint" or draw(st.booleans()) is False:
            at = draw(st.integers(0, len(data) - 1))
        else:
            at = draw(st.integers(0, max(end - 1, 0)))
        bit = draw(st.integers(1, 255))
        data[at] ^= bit
        flips.append((at, bit))
    target.write_bytes(bytes(data))
    return path, f"{form}: {target.name} bytes flipped {flips}"


# --------------------------------------------------------------------------- the property


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_a_damaged_save_loads_or_says_why(valid: dict[str, Any], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, what = data.draw(damaged(valid, Path(tmp)), label="damage")
        out, err = io.StringIO(), io.StringIO()
        with deadline(SECONDS_PER_EXAMPLE), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = retrofit.load(path)
                assert isinstance(model, nn.Module)
            except RetrofitError as e:
                assert "\n" not in str(e).strip(), f"{what}: a message of several lines: {e}"
            except Hang:
                raise
            except BaseException as e:
                raise AssertionError(f"{what}: load raised {type(e).__name__}: {e}") from e
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["diff", str(valid["file"]), str(path)])
        assert code in (0, 2), f"{what}: retrofit diff exited {code}: {err.getvalue()}"
        if code == 2:
            assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
