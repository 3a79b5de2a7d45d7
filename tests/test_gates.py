"""Gate inspection: values per site, channel and class; the per-stage plot; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from retrofit import get_report
from retrofit.data import digits_datasets
from retrofit.finetune import FinetuneConfig, fit
from retrofit.gates import GateRecord, gates_main, plot_gates, record_gates

from .finetune_helpers import build, one_thread, tiny_digits  # noqa: F401

PNG = b"\x89PNG\r\n\x1a\n"


def _batch(n: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    val = digits_datasets(32, 1, augment=False).val
    return torch.stack([val[i][0] for i in range(n)]), torch.tensor([int(val[i][1]) for i in range(n)])


@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_record_shapes_and_identity_values(attn: str) -> None:
    gm = build(attn)
    x, y = _batch()
    rec = record_gates(gm, x, y, classes=[str(i) for i in range(10)], batch_size=25)
    rows = get_report(gm).rows
    assert [s.module for s in rec.sites] == [r.module for r in rows] and len(rows) == 8
    assert rec.num_images == 60 and torch.equal(rec.labels, y)
    for s, r in zip(rec.sites, rows, strict=True):
        assert s.values.shape == (60, r.channels)
        assert s.method == ("channel_scale" if attn == "cbam" else "scale")
        # identity gates start at exactly 1.0 for every image and channel
        assert torch.equal(s.values, torch.ones_like(s.values))
        assert rec.per_class(s.module).shape == (10, r.channels)
    stages = rec.stages()
    assert [size for size, _ in stages] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [len(sites) for _, sites in stages] == [2, 2, 2, 2]
    assert rec.skipped == ()
    assert gm.training  # left in the mode it was found in


def test_per_class_means_and_summary() -> None:
    gm = build("se", gate="sigmoid")  # random gates, different per image
    x, y = _batch(40)
    rec = record_gates(gm, x, y, limit=30)
    assert rec.num_images == 30 and len(rec.labels) == 30
    site = rec.sites[-1]
    pc = rec.per_class(site.module)
    for k in y[:30].unique():
        assert torch.allclose(pc[k], site.values[y[:30] == k].mean(0), atol=1e-6)
    assert ((site.values > 0) & (site.values < 1)).all()
    d = rec.to_dict(values=True)
    assert len(d["sites"]) == 8 and len(d["sites"][0]["per_class"]) == int(y[:30].max()) + 1
    assert "class spread" in rec.summary()
    json.dumps(d)
    unlabeled = record_gates(gm, x)
    assert unlabeled.labels is None
    with pytest.raises(ValueError, match="per-class gates need labels"):
        unlabeled.per_class(site.module)


def test_module_without_a_gate_method_is_skipped() -> None:
    gm = build("se")
    gm.get_submodule("layer2.1").se = nn.Identity()  # what a gate-less attention looks like
    rec = record_gates(gm, _batch(8)[0])
    assert [m for m, _ in rec.skipped] == ["layer2.1.se"]
    assert "Identity has no channel-gate method (scale or channel_scale)" in rec.skipped[0][1]
    assert len(rec.sites) == 7


def test_plot_writes_a_png(tmp_path: Path) -> None:
    gm = build("cbam", gate="sigmoid")
    x, y = _batch(30)
    out = plot_gates(record_gates(gm, x, y), tmp_path / "sub" / "gates.png", title="cbam")
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no gates to plot"):
        plot_gates(GateRecord((), None, None, (("a.se", "why"),)), tmp_path / "none.png")


def test_gates_cli_on_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gm = build("se")
    train, val = tiny_digits(64, 32)
    fit(gm, train, val, FinetuneConfig(epochs=1, batch_size=32, progress=False, out=str(tmp_path / "run")))
    code = gates_main([str(tmp_path / "run" / "last.pt"), "--digits", "--samples", "50",
                       "--out", str(tmp_path / "g.png"), "--json", str(tmp_path / "g.json")])
    assert code == 0
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG
    d = json.loads((tmp_path / "g.json").read_text())
    assert d["num_images"] == 50 and len(d["sites"]) == 8
    assert "layer4.1.se" in capsys.readouterr().out
    assert gates_main([str(tmp_path / "missing.pt"), "--digits"]) == 2
    assert "training checkpoint" in capsys.readouterr().err
