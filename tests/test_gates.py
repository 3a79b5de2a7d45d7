"""Gate inspection: values per site, channel and class; the per-stage plot; the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from example_data import digits_datasets  # examples/, on sys.path through conftest.py
from torch import nn
from torch.utils.data import Subset

import retrofit
from retrofit import get_attention, get_report, list_attention
from retrofit.cli import main
from retrofit.finetune import FinetuneConfig, fit
from retrofit.gates import GateRecord, plot_gates, record_gates

from .finetune_helpers import NARROW, build, digits_imagefolder, one_thread  # noqa: F401

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
    assert rec.skipped[0][1] == ("Identity declares no channel gate (its class's fused_gates names none: "
                                 "its forward is not x * gate(x))")
    assert len(rec.sites) == 7


# Every built-in type: where its gate comes from, or that it has none.
GATE_OF = {"se": "scale", "eca": "scale", "cbam": "channel_scale", "coord": "scale", "ge": "scale",
           "simam": "scale", "gc": None, "nonlocal": None, "chsa": None, "psa": None,
           "ese": "scale", "ecam": "scale", "ceca": "scale", "gca": None, "lcbam": "channel_scale", "scoord": "scale",
           "ela": "scale", "strip": "scale",
           "ema": "scale", "gam": "channel_scale", "shuffle": "scale", "triplet": "scale", "bam": "scale",
           "scse": "scale", "lska": "scale", "mlca": "scale", "sge": "scale", "polarized": "scale"}
# Sites of the narrow ResNet-18 (16 to 128 channels) each built-in rule set fills where it is
# not 8: groups that do not divide 16 (ema: 32) or 32 and 16 (sge: 64; shuffle: 2 x 64), and
# BAM's three stage ends.
SITES = {"ema": 6, "sge": 4, "shuffle": 2, "bam": 3}
NO_GATE = {"gc": "GlobalContext", "nonlocal": "NonLocal", "chsa": "ChannelSelfAttn", "psa": "PointwiseSpatialAttn",
           "gca": "GlobalContextAdd"}


def test_every_builtin_type_is_covered() -> None:
    builtin = {name for name in list_attention() if get_attention(name).__module__.startswith("retrofit.attention.")}
    assert builtin == set(GATE_OF)


@pytest.mark.parametrize("attn", sorted(GATE_OF))
def test_record_gates_on_every_type(attn: str) -> None:
    """Gating types record their channel gate (exactly 1.0 at init); additive ones are
    listed as skipped, with why, and nothing crashes (GC's scale() raises without fuse_scale)."""
    gm = build(attn)
    rows = get_report(gm).rows
    assert len(rows) == SITES.get(attn, 8)
    rec = record_gates(gm, _batch(6)[0])
    if GATE_OF[attn] is None:
        assert rec.sites == ()
        assert [m for m, _ in rec.skipped] == [r.module for r in rows]
        assert {why for _, why in rec.skipped} == {
            f"{NO_GATE[attn]} declares no channel gate (its class's fused_gates names none: "
            "its forward is not x * gate(x))"}
    else:
        assert rec.skipped == ()
        assert [s.module for s in rec.sites] == [r.module for r in rows]
        for s, r in zip(rec.sites, rows, strict=True):
            assert s.method == GATE_OF[attn]
            assert torch.equal(s.values, torch.ones(6, r.channels))


def test_gc_with_scale_fusion_alone_has_a_gate() -> None:
    torch.manual_seed(0)
    base = retrofit.create_model("resnet18", **NARROW)
    gm = retrofit.retrofit(base, "gc", attn_args={"fuse_add": False, "fuse_scale": True}, gate="sigmoid",
                           input_size=(1, 32, 32), verify=False)
    x = _batch(6)[0]
    rec = record_gates(gm, x)
    assert rec.skipped == () and len(rec.sites) == 8
    first = gm.get_submodule(rec.sites[0].module)
    with torch.no_grad():
        gm.eval()
        seen = []
        h = first.register_forward_pre_hook(lambda m, a: seen.append(m.scale(a[0]).flatten(1)))
        gm(x)
        h.remove()
    assert torch.equal(rec.sites[0].values, seen[0])  # the sigmoid gate of each image, as scale() computes it


def test_plot_writes_a_png(tmp_path: Path) -> None:
    gm = build("cbam", gate="sigmoid")
    x, y = _batch(30)
    out = plot_gates(record_gates(gm, x, y), tmp_path / "sub" / "gates.png", title="cbam")
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no gates to plot"):
        plot_gates(GateRecord((), None, None, (("a.se", "why"),)), tmp_path / "none.png")


def test_gates_cli_on_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`retrofit gates` on a fine-tuning checkpoint and the digits validation images as an
    ImageFolder. The command preprocesses with the model's timm data config (RGB, 224x224
    for resnet18), so this model takes 3 channels; it trains on the digits at 3x32x32."""
    torch.manual_seed(0)
    base = retrofit.create_model("resnet18", **{**NARROW, "in_chans": 3})
    gm = retrofit.retrofit(base, "se", input_size=(3, 32, 32), verify=False)
    digits = digits_datasets(32, 3)
    fit(gm, Subset(digits.train, range(64)), Subset(digits.val, range(32)),
        FinetuneConfig(epochs=1, batch_size=32, progress=False, out=str(tmp_path / "run")))
    data = str(digits_imagefolder(tmp_path / "val"))
    code = main(["gates", str(tmp_path / "run" / "last.pt"), "--data", data, "--samples", "50",
                 "--out", str(tmp_path / "g.png"), "--json", str(tmp_path / "g.json")])
    assert code == 0
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG
    d = json.loads((tmp_path / "g.json").read_text())
    assert d["num_images"] == 50 and len(d["sites"]) == 8
    out = capsys.readouterr().out
    assert "layer4.1.se" in out
    # printed as lines, escaped once: no literal "\n" before the last line
    assert out.endswith(f"\n\nwrote {tmp_path / 'g.png'}\nwrote {tmp_path / 'g.json'}\n") and "\\n" not in out
    # Errors go through the command line's one place: exit 2 and one line.
    assert main(["gates", str(tmp_path / "missing.pt"), "--data", data]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retrofit gates: error: ") and "training checkpoint" in err and err.count("\n") == 1
    assert main(["gates", str(tmp_path / "run" / "last.pt"), "--data", data, "--device", "bogus"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retrofit gates: error: --device 'bogus' is not a device (") and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    assert main(["gates", str(tmp_path / "run" / "last.pt"), "--data", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"retrofit gates: error: {tmp_path / 'empty'} is not an ImageFolder: Couldn't find any "
                          "class folder")
    assert err.count("\n") == 1
