"""Site scores: the gradient at each identity-initialised module, before any training, and
rules that choose sites by score or within a budget."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import retrofit
from retrofit import RuleError, SiteScores, score_sites
from retrofit.rulefile import parse_rules, resolve_rules

from .conftest import run_cli
from .finetune_helpers import NARROW, digits_imagefolder


class Block(nn.Module):
    """conv -> BN branch and the identity; a noisy block's branch also carries a loud random
    projection of its input, unrelated to the label: closing its gate lowers the loss."""

    def __init__(self, channels: int, noisy: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.noise = nn.Conv2d(channels, channels, 3, padding=1, bias=False) if noisy else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bn(self.conv(x))
        if self.noise is not None:
            b = torch.add(b, self.noise(x), alpha=50.0)  # a weighted sum: not a residual site itself
        return F.relu(x + b)


class Toy(nn.Module):
    def __init__(self, noisy: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(*(Block(8, noisy=i == noisy) for i in range(3)))
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


def _loader(n: int = 256, size: int = 8, channels: int = 1) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, size, size, generator=gen)
    y = (x.mean((1, 2, 3)) > 0).long()  # the label is the image's mean; the noise ignores it
    return DataLoader(TensorDataset(x, y), batch_size=64)


def _toy(noisy: int) -> Toy:
    torch.manual_seed(0)
    return Toy(noisy).eval()


@pytest.mark.parametrize("noisy", [0, 2])
def test_the_site_whose_gate_can_fix_a_defect_ranks_first(noisy: int) -> None:
    # (With the noise in the middle block, the last block's branch, which reads the noisy
    # stream, scores higher: its gate moves the loss more. The score is the loss's
    # sensitivity to opening each gate, not a diagnosis of where a defect enters.)
    scores = score_sites(_toy(noisy), "se", _loader(), batches=4)
    assert [r.path for r in scores.rows] == ["blocks.0", "blocks.1", "blocks.2"]
    best, second = scores.ranked()[:2]
    assert best.path == f"blocks.{noisy}" and best.score > 2 * second.score


def test_scores_are_deterministic_and_leave_the_model_alone() -> None:
    model = _toy(1)
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    a = score_sites(model, "cbam", _loader(), batches=3)
    b = score_sites(model, "cbam", _loader(), batches=3)
    assert a == b and a.batches == 3 and a.images == 192
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [m.training for m in model.modules()]
    assert not any(p.grad is not None for p in model.parameters())


def test_scores_carry_costs() -> None:
    model = _toy(1)
    scores = score_sites(model, "se", _loader(), batches=1)
    row = scores.rows[0]
    # SE at 8 channels: fc1 8 -> 8, fc2 8 -> 8, with biases; 2 x 64 multiply-adds per sample
    assert (row.params, row.flops, row.channels, row.size) == (144, 256, 8, (8, 8))
    assert scores.model_params == sum(p.numel() for p in model.parameters())
    # a multiply-add is 2 FLOPs: the stem (1 -> 8), three block convs and the noise conv (8 -> 8), fc
    assert scores.model_flops == 2 * (64 * 8 * 9 + 4 * 64 * 8 * 8 * 9 + 8 * 2)
    assert row.score == pytest.approx(row.grad_norm / (8 * 8 + 8) ** 0.5)  # RMS over fc2's weight and bias
    assert SiteScores.from_dict(scores.to_dict()) == scores
    assert "rank" in str(scores) and "blocks.1" in scores.table()


def test_every_attention_type_can_be_scored() -> None:
    torch.manual_seed(0)
    model = retrofit.create_model("resnet18", **NARROW).eval()
    for attn in retrofit.list_attention():
        scores = score_sites(model, attn, _loader(64, 32), batches=1)
        assert scores.rows and all(r.score > 0 for r in scores.rows), attn


def test_zero_branches_warn_that_scores_cannot_rank() -> None:
    model = retrofit.create_model("resnet18", num_classes=2, in_chans=1)  # zero_init_last: branches output 0
    with pytest.warns(UserWarning, match="every site of ResNet scores 0"):
        scores = score_sites(model, "se", _loader(64, 32), batches=1)
    assert {r.score for r in scores.rows} == {0.0}


def test_bad_score_data() -> None:
    with pytest.raises(retrofit.OptionError, match="at least one .images, labels. batch"):
        score_sites(_toy(1), "se", [], batches=2)
    with pytest.raises(retrofit.OptionError, match=r"must yield \(images, labels\) batches"):
        score_sites(_toy(1), "se", [torch.zeros(2, 1, 8, 8)], batches=2)


def test_rules_select_the_top_sites_by_score() -> None:
    model = _toy(2)
    scores = score_sites(model, "se", _loader(), batches=4)
    rules = resolve_rules("se").selecting(top=1)
    gm = retrofit.retrofit(model, rules=rules, scores=scores, input_size=(1, 8, 8))
    assert [r.module for r in retrofit.get_report(gm).rows] == ["blocks.2.se"]
    plan = retrofit.plan(model, rules=rules, scores=scores, input_size=(1, 8, 8))
    assert plan.placements[0].score == scores.ranked()[0].score
    reasons = dict((s.path, why) for s, why in plan.skipped)
    assert reasons["blocks.0"].startswith(f"score {scores.rows[0].score:.3g} ranks 3 of 3; select = {{ top = 1 }}")


@pytest.mark.parametrize("fraction", [0.06, 0.12, 0.2])
def test_budgets_select_within_the_budget(fraction: float) -> None:
    model = _toy(1)
    scores = score_sites(model, "se", _loader(), batches=4)
    doc = {"rule": [{"at": "residual-add", "attn": "se", "budget": {"params": fraction}}]}
    plan = retrofit.plan(model, rules=parse_rules(doc, "budget.toml"), scores=scores, input_size=(1, 8, 8))
    chosen = [scores.get(p.site.qualname, p.position) for p in plan.placements]
    assert sum(r.params for r in chosen) <= fraction * scores.model_params
    assert len(chosen) == int(fraction * scores.model_params // 144)  # every SE here costs 144
    # the best-scored first
    assert [r.path for r in chosen] == sorted(r.path for r in scores.ranked()[: len(chosen)])
    for budget, count in ((0.0005, 0), (0.001, 1)):  # 152 and 304 FLOPs of 304,160; an SE here costs 256
        flops = parse_rules({"rule": [{"at": "residual-add", "attn": "se", "budget": {"flops": budget}}]}, "f.toml")
        placed = retrofit.plan(model, rules=flops, scores=scores, input_size=(1, 8, 8)).placements
        assert [p.site.path for p in placed] == [r.path for r in scores.ranked()[:count]]


def test_selection_by_score_needs_scores_and_valid_keys() -> None:
    with pytest.raises(RuleError, match=r"r.toml, rule 1: select / budget choose sites by score; give scores"):
        retrofit.plan(_toy(1), rules=parse_rules({"rule": [{"at": "residual-add", "attn": "se",
                                                              "select": {"top": 2}}]}, "r.toml"), input_size=8)
    for table, message in [
        ({"select": {"top": 0}}, r"select.top must be an integer of at least 1, got 0"),
        ({"select": {"best": 2}}, r"select must be \{ top = K \}"),
        ({"budget": {"params": 0}}, r"budget.params is a fraction of the model's params in \(0, 1\]"),
        ({"budget": {"params": 2}}, r"budget.params is a fraction"),
        ({"budget": {"memory": 0.1}}, r"budget must be one of \{ params = F \} or \{ flops = F \}"),
    ]:
        with pytest.raises(RuleError, match=r"b.toml, rule 1: " + message):
            parse_rules({"rule": [{"at": "residual-add", "attn": "se", **table}]}, "b.toml")


def test_a_save_keeps_the_choice(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = retrofit.create_model("resnet18", **NARROW).eval()
    scores = score_sites(model, "se", _loader(64, 32), batches=1)
    gm = retrofit.retrofit(model, rules=resolve_rules("se").selecting(top=3), scores=scores, input_size=(1, 32, 32))
    loaded = retrofit.load(retrofit.save(gm, tmp_path / "m.safetensors"))
    assert [r.module for r in retrofit.get_report(loaded).rows] == [r.module for r in retrofit.get_report(gm).rows]
    assert len(retrofit.get_report(loaded).rows) == 3


def test_cli_scores_and_budget(tmp_path: Path) -> None:
    import json

    data = digits_imagefolder(tmp_path / "digits")  # an ImageFolder, scored at the model's 224x224
    r = run_cli("resnet18", "--input-size", "32", "--num-classes", "10", "--score-data", str(data),
                "--score-batches", "1", "--budget", "top=2", "--format", "json", "-q")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["sites"]) == 2 and len(out["scores"]["rows"]) == 8 and out["scores"]["images"] == 32
    r = run_cli("resnet18", "--budget", "params=2%")
    assert r.returncode == 2 and r.stderr.strip().endswith("give the data to score them on with --score-data DIR "
                                                           "(an ImageFolder)")
    r = run_cli("resnet18", "--budget", "params=200%")
    assert r.returncode == 2 and "'params=200%' is not a budget" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.examples
def test_placement_experiment_pipeline(tmp_path: Path) -> None:
    """examples/placement.py end to end on a tiny IDX set, two processes sharing the run:
    bases trained when the Fashion-MNIST run has none, scores, every contender once, the
    report."""
    import json
    import os
    import subprocess
    import sys

    from .test_fashion_mnist import make_fashion

    root = make_fashion(tmp_path / "fm", n_train=300, n_test=100)
    cmd = [sys.executable, "examples/placement.py", "--data-root", str(root), "--out", str(tmp_path / "out"),
           "--base-dir", str(tmp_path / "none"), "--work", str(tmp_path / "work"), "--seeds", "0", "--k", "2",
           "--score-batches", "2", "--val-size", "50", "--base-epochs", "1", "--epochs", "1", "--threads", "1",
           "--resume"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for _, e in outputs]
    started = sorted(line.split("] ")[1].removesuffix(" ...") for o, _ in outputs for line in o.splitlines()
                     if line.startswith("[") and line.endswith(" ..."))
    units = sorted(p.stem.replace("__", "/") for p in (tmp_path / "out" / "units").glob("*.json"))
    assert started == units and len(units) == 1 + 1 + 5 + 8  # base, scores, runs: each made once
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["complete"] and res["units"] == {"done": 1 + 5 + 8, "total": 14}
    seed = res["seeds"]["0"]
    assert len(seed["scores"]) == 8 and len(seed["single_site"]) == 8
    runs = seed["runs"]
    assert runs["none"]["sites"] == [] and len(runs["all"]["sites"]) == 8
    top = [row["path"] for row in sorted(seed["scores"], key=lambda row: -row["score"])[:2]]
    assert sorted(runs["top"]["sites"]) == sorted(top) and len(runs["random"]["sites"]) == 2
    assert (tmp_path / "out" / "score_vs_gain.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| top |" in md and "--threads" not in md and "--resume" not in md
    # --report-only rewrites the same report from the units, running nothing
    (tmp_path / "out" / "results.md").unlink()
    r = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                       timeout=300)
    assert r.returncode == 0 and " ..." not in r.stdout, r.stderr[-3000:]
    assert (tmp_path / "out" / "results.md").read_text() == md


def test_placement_statistics() -> None:
    """The pooled rank correlation ranks within each seed, and its permutation p-value is
    the smallest possible when every seed agrees perfectly, 1 when there is no relation."""
    import placement  # examples/placement.py (examples/ is on sys.path through conftest.py)

    scores = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    # Same order in each seed, at different levels: pooled within seeds, a perfect relation.
    agree = [(scores, [g + level for g in scores]) for level in (0.0, 100.0, -50.0)]
    assert placement.pooled_spearman(agree) == pytest.approx(1.0)
    assert placement.permutation_p(agree, draws=999) == pytest.approx(1 / 1000)
    # Gains that rise to the middle and fall again: no monotone relation.
    flat = [(scores, [1.0, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 1.0])]
    assert placement.pooled_spearman(flat) == pytest.approx(0.0, abs=1e-12)
    assert placement.permutation_p(flat, draws=99) == 1.0
    assert placement.permutation_p(agree, draws=200, seed=3) == placement.permutation_p(agree, draws=200, seed=3)
