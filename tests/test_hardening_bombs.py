"""Bounded parsing: files and arguments that ask for unbounded work (a depth multiple of
100000, yaml aliases that expand without end, 50,000 levels of nesting, a FIFO given as a
rule file, JSON nested 30,000 deep) are refused at once, as a RetrofitError (the CLI's exit
2, one line), never a hang, an internal error or a crash of the interpreter; and the
messages about damaged files say what is wrong.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import retrofit
from retrofit import ModelLoadError, UntrustedCodeError
from retrofit.cli import main
from retrofit.readfile import Limits, parse_yaml
from retrofit.text import shorten

from .hostile_yolo import TINY_YOLO, cfg_edit
from .timeouts import deadline

ROOT = Path(__file__).resolve().parents[1]


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str], match: str) -> None:
    with deadline(60):
        code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err and "internal error" not in err, err


# --------------------------------------------------------------------------- YOLO scales


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["scales"].update(n=[100000, 0.25, 1024]), "its scale 'n' is [100000, 0.25, 1024]: depth and width "
                                                           "multiples must lie in (0, 16]"),
    (lambda c: c.update(scales=None, depth_multiple=1e9), "its depth_multiple 1000000000.0 is not a number in (0, 16]"),
    (lambda c: c["scales"].update(n=[1, 1e6, 1024]), "depth and width multiples must lie in (0, 16]"),
    (lambda c: c["backbone"].__setitem__(2, [-1, 100000, "C2f", [128, True]]), "layer 2 repeats 100000 times, not 1 to 64"),
    (lambda c: c["backbone"].extend([[-1, 64, "C2f", [128, True]]] * 300), "its layers expand to"),
])
def test_a_yolo_scale_bomb_is_refused_before_building(yolo_save: Path, tmp_path: Path, edit, message: str) -> None:
    save = cfg_edit(yolo_save, tmp_path / "save", edit)
    with deadline(30), pytest.raises(ModelLoadError, match=re.escape(message)) as e:
        retrofit.load(save)
    assert not isinstance(e.value, UntrustedCodeError)  # a bomb is not code: trust does not let it through
    with deadline(30), pytest.raises(ModelLoadError, match=re.escape(message)):
        retrofit.load(save, trust_code=True)


def test_the_layer_cap_is_a_limit(yolo_save: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"its layers expand to 5 modules with its depth multiple 0.33, over the "
                                             r"limit of 3 \(Limits.model_layers\)"):
        retrofit.load(yolo_save, limits=Limits(model_layers=3))


# --------------------------------------------------------------------------- yaml


def test_a_yaml_of_nested_aliases_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Billion laughs: nine levels of nine aliases each would be 387 million list items."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = yaml.safe_dump(TINY_YOLO) + "\n".join(lines) + "\n"
    (tmp_path / "bomb.yaml").write_text(text)
    _one_line_exit_2([f"ultralytics:{tmp_path / 'bomb.yaml'}", "--attn", "se", "--dry-run"], capsys,
                     "it uses a yaml alias (*a0, line")


def test_a_deep_yaml_is_refused_in_a_process_that_survives(tmp_path: Path) -> None:
    """50,000 levels: Ultralytics' yaml reader (the C loader) dies with a segmentation fault."""
    (tmp_path / "deep.yaml").write_text(yaml.safe_dump(TINY_YOLO) + "x: " + "[" * 50_000 + "]" * 50_000 + "\n")
    r = subprocess.run([sys.executable, "-m", "retrofit", f"ultralytics:{tmp_path / 'deep.yaml'}", "--attn", "se",
                        "--dry-run"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "YOLO_OFFLINE": "1"})
    assert r.returncode == 2 and "nests deeper than the limit of 128 (Limits.json_depth)" in r.stderr, r.stderr


@pytest.mark.parametrize("text,message", [
    ("a: &x [1]\nb: *x\n", r"it uses a yaml alias \(\*x, line 2\)"),
    ("a: " + "[" * 200 + "]" * 200, r"nests deeper than the limit of 128"),
    ("a: [1, 2\n", r"not valid yaml"),
    ("a: !!python/object/apply:os.system ['touch x']\n", r"not valid yaml"),
    (b"a: \xff\n", r"not UTF-8"),
])
def test_yaml_is_read_within_bounds(text: str | bytes, message: str) -> None:
    with deadline(20), pytest.raises(ModelLoadError, match=message):
        parse_yaml(text, "t.yaml")


# --------------------------------------------------------------------------- command-line inputs


def test_a_fifo_as_the_rule_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "rules.toml"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "retrofit", "test_resnet", "--rules", str(fifo), "--dry-run"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "not a regular file (a FIFO" in r.stderr and len(r.stderr.splitlines()) == 1, \
        r.stderr


@pytest.mark.parametrize("value,message", [
    ("[" * 30_000 + "]" * 30_000, "its JSON value nests too deeply to read"),
    ("[" * 40 + "]" * 40, "its JSON value nests too deeply to read"),
    ("[1, 2", "'[1, 2' is not valid JSON"),
    ("1" * 5000, "is not valid JSON"),
])
def test_every_bad_model_argument_is_exit_2(value: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["test_resnet", "--attn", "se", "--dry-run", "--model-arg", f"x={value}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


# --------------------------------------------------------------------------- messages that tell the truth


def test_a_bad_checkpoint_path_says_what_is_wrong_with_it(capsys: pytest.CaptureFixture[str]) -> None:
    _one_line_exit_2(["test_resnet", "--attn", "se", "--dry-run", "--model-arg", "checkpoint_path=/no/such.pth"],
                     capsys, "its checkpoint_path '/no/such.pth' cannot be read (not found)")


def test_messages_are_shortened_where_a_clause_ends() -> None:
    text = ("the first clause says what failed, the second says where it failed; the third, which is long, says "
            "what to try instead of what was done")
    assert shorten(text, 80) == "the first clause says what failed, the second says where it failed; ..."
    assert shorten("one two three four five six seven", 12) == "one two ..."
    assert shorten("short", 80) == "short"
    assert shorten("a\n  b", 80) == "a b"


def test_a_training_checkpoint_torch_cannot_read_is_named_whole_words(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 200)
    with pytest.raises(ModelLoadError) as e:
        retrofit.load(path)
    message = str(e.value)
    assert "cannot read training checkpoint" in message and "expected a last.pt or best.pt" in message
    inner = message.split("in torch.load: ", 1)[1].rsplit("); expected", 1)[0]
    assert inner.endswith((".", "...", ")", "'")) or len(inner) < 200, inner
