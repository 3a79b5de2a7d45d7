"""End to end on real models: golden site counts, exact identity at init, backward, gradients."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.data import resolve_data_config

import retrofit
from retrofit import SiteError, get_report

from .conftest import build, cached
from .test_attention import CLOSED_FORM

# model -> (site kind, number of sites, input size for the test)
ZOO = {
    "resnet18": ("residual-add", 8, 64),
    "resnet50": ("residual-add", 16, 64),
    "resnet50d": ("residual-add", 16, 64),
    "resnext50_32x4d": ("residual-add", 16, 64),
    "regnety_008": ("residual-add", 14, 64),
    "efficientnet_b0": ("residual-add", 9, 64),
    "mobilenetv3_large_100": ("residual-add", 10, 64),
    "convnext_tiny": ("residual-add", 18, 64),
    "densenet121": ("conv-block", 120, 64),
    "vgg11_bn": ("conv-block", 8, 64),
    "tv:resnet50": ("residual-add", 16, 64),
    "tv:mobilenet_v3_large": ("residual-add", 10, 64),
    "small_cnn": ("conv-block", 2, (1, 28, 28)),
}

RESNET50_PATHS = [f"layer{s}.{b}" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3), strict=True) for b in range(n)]


def _new_params(gm: torch.fx.GraphModule) -> dict[str, torch.nn.Parameter]:
    prefixes = tuple(f"{r.module}." for r in get_report(gm).rows)
    return {n: p for n, p in gm.named_parameters() if n.startswith(prefixes)}


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("attn", ["se", "eca", "cbam"])
def test_zoo_golden_count_identity_and_delta(name: str, attn: str) -> None:
    kind, count, size = ZOO[name]
    model = cached(name)
    gm = retrofit.retrofit(model, attn, input_size=size)
    report = get_report(gm)
    assert len(report.rows) == count
    assert {r.kind for r in report.rows} == {kind}
    assert report.max_abs_diff == 0.0 and report.identity_ok is True
    per_site = [CLOSED_FORM[attn](r.channels) for r in report.rows]
    assert [r.params for r in report.rows] == per_site
    assert report.params_after - report.params_before == sum(per_site)
    gm.graph.lint()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_backward_reaches_every_gate(name: str) -> None:
    _, count, size = ZOO[name]
    gm = retrofit.retrofit(build(name), "cbam", input_size=size).train()
    size = (3, size, size) if isinstance(size, int) else size
    out = gm(torch.randn(2, *size))
    out.float().square().mean().backward()
    rows = get_report(gm).rows
    assert len(rows) == count
    for row in rows:
        # The zero-initialized spatial convolution gets gradient at the first step. (The
        # channel MLP's fc2 does too unless all its ReLU units are dead on this random
        # model, e.g. 2 hidden units at 32 channels; the two-step test covers all params.)
        grad = gm.get_submodule(row.module).spatial.weight.grad
        assert grad is not None and grad.abs().sum() > 0, row.module


def test_resnet50_golden_sites_and_seresnet50_parity() -> None:
    model = cached("resnet50")
    gm = retrofit.retrofit(model, "se", gate="sigmoid", verify=False)
    report = get_report(gm)
    assert [r.path for r in report.rows] == RESNET50_PATHS
    assert [r.module for r in report.rows] == [f"{p}.se" for p in RESNET50_PATHS]
    assert report.params_after == 28_088_024
    assert report.params_after == sum(p.numel() for p in timm.create_model("seresnet50").parameters())
    # The names match timm's seresnet50, so its (paper-style) weights load into the result.
    se_keys = {k for k in timm.create_model("seresnet50").state_dict() if ".se." in k}
    assert se_keys == {k for k in gm.state_dict() if ".se." in k}


def test_resnet50_shortcut_kinds() -> None:
    analysis = retrofit.analyze(cached("resnet50"), input_size=64)
    kinds = [s.shortcut_kind for s in analysis.of_kind("residual-add")]
    assert kinds == ["projection" if p.endswith(".0") else "identity" for p in RESNET50_PATHS]
    assert [s.channels for s in analysis.of_kind("residual-add")] == [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3


def test_small_cnn_conv_block_golden(small_cnn) -> None:
    analysis = retrofit.analyze(small_cnn, input_size=(1, 28, 28))
    blocks = analysis.of_kind("conv-block")
    assert [(s.path, s.layers, s.channels, s.size) for s in blocks] == [
        ("conv1", ("conv1", "pool1", "relu"), 8, (14, 14)),
        ("conv2", ("conv2", "pool2", "relu_1"), 16, (7, 7)),
    ]
    gm = retrofit.retrofit(small_cnn, "se", input_size=(1, 28, 28))
    assert [r.module for r in get_report(gm).rows] == ["conv1_se", "conv2_se"]


def test_analysis_and_plan_print_as_tables(small_cnn) -> None:
    """print(retrofit.analyze(...)) and print(retrofit.plan(...)) show tables, not dataclass reprs."""
    analysis = retrofit.analyze(small_cnn, input_size=(1, 28, 28))
    assert str(analysis) == analysis.table()
    lines = str(analysis).splitlines()
    assert lines[0].split() == ["site", "kind", "channels", "size", "stage", "block", "shortcut", "mid", "existing",
                                "attention", "/", "why", "not"]
    assert lines[2].split() == ["conv1", "conv-block", "8", "14x14", "1", "0"]
    assert lines[3].split() == ["conv2", "conv-block", "16", "7x7", "2", "0"]
    assert len(lines) == 4
    plan = retrofit.plan(small_cnn, "se", input_size=(1, 28, 28))
    assert str(plan) == plan.table()
    text = str(plan)
    assert "SiteAnalysis(" not in text and "Plan(" not in text
    assert [line.split() for line in text.splitlines()[2:]] == [
        ["conv1", "conv-block", "8", "14x14", "1", "se", "(after)", "built-in", "'se',", "rule", "2"],
        ["conv2", "conv-block", "16", "7x7", "2", "se", "(after)", "built-in", "'se',", "rule", "2"],
    ]


def test_input_size_from_timm_config_and_default() -> None:
    assert retrofit.analyze(cached("resnet18")).sites[0].size == (56, 56)  # pretrained_cfg: 224
    assert retrofit.analyze(cached("tv:resnet50")).sites[0].size == (56, 56)  # no cfg: 224
    assert retrofit.analyze(cached("resnet18"), input_size=(3, 64, 96)).sites[0].size == (16, 24)


def test_every_new_parameter_learns_within_two_steps() -> None:
    torch.manual_seed(0)
    for attn in ("se", "eca", "cbam"):
        gm = retrofit.retrofit(build("resnet18"), attn, input_size=64).train()
        new = _new_params(gm)
        assert len(new) == {"se": 4, "eca": 1, "cbam": 4}[attn] * 8
        opt = torch.optim.SGD(gm.parameters(), lr=0.05)
        seen = dict.fromkeys(new, False)
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 1000, (4,))
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(gm(x), y).backward()
            for n, p in new.items():
                seen[n] |= bool(p.grad.abs().sum() > 0)
            opt.step()
        assert all(seen.values()), [n for n, s in seen.items() if not s]


def test_identity_holds_in_train_mode() -> None:
    model = build("resnet18").train()
    gm = retrofit.retrofit(model, "cbam", input_size=64)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(gm.train()(x), ref.train()(x))


def test_original_untouched_and_nothing_shared() -> None:
    model = build("resnet18").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    gm = retrofit.retrofit(model, "se", input_size=64)
    ours = {t.data_ptr() for t in gm.state_dict().values()}
    assert not ours & {t.data_ptr() for t in model.state_dict().values()}
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm.train()(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [m.training for m in model.modules()]
    assert not any(type(m).__name__ == "SqueezeExcite" for m in model.modules())


class _CachedScale(torch.nn.Module):
    """A block that caches a tensor computed from a parameter in eval mode, as timm's
    TinyViT and EfficientFormer cache their attention biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.scale = torch.nn.Parameter(torch.ones(8, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            scale = self.scale * 2
        else:
            scale = self.cache.setdefault("cpu", self.scale * 2)
        return x + torch.relu(self.bn(self.conv(x))) * scale


@pytest.mark.parametrize("keep_class", [False, True], ids=["graph-module", "keep-class"])
def test_model_with_a_cache_from_an_eval_forward(keep_class: bool) -> None:
    # After an eval forward with autograd on, the cached tensor has history, which
    # copy.deepcopy refuses; the copy gets it detached, the original keeps its own.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _CachedScale(), _CachedScale()).eval()
    x = torch.randn(2, 3, 16, 16)
    want = model(x)
    before = [id(t) for m in model.modules() for t in getattr(m, "cache", {}).values()]
    assert len(before) == 2 and model[1].cache["cpu"].grad_fn is not None
    gm = retrofit.retrofit(model, "se", input_size=(3, 16, 16), keep_class=keep_class).eval()
    assert [id(t) for m in model.modules() for t in getattr(m, "cache", {}).values()] == before
    assert not {id(t) for m in gm.modules() for t in (getattr(m, "cache", None) or {}).values()} & set(before)
    assert len(get_report(gm).rows) == 2 and torch.equal(gm(x), want)


def test_tiny_vit_after_an_eval_forward_keeps_its_class() -> None:
    # The model that showed it in the keep_class zoo pass.
    model = timm.create_model("tiny_vit_5m_224").eval()
    x = torch.randn(1, 3, 224, 224)
    want = model(x)
    gm = retrofit.retrofit(model, "se", keep_class=True).eval()
    assert type(gm) is type(model) and len(get_report(gm).rows) == 2 and torch.equal(gm(x), want)


def test_original_names_and_values_kept() -> None:
    model = cached("resnet50d")
    sd = retrofit.retrofit(model, "eca", input_size=64).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_unused_parameters_survive() -> None:
    model = build("small_cnn")
    model.unused = torch.nn.Linear(3, 3)
    sd = retrofit.retrofit(model, "se", input_size=(1, 28, 28)).state_dict()
    assert torch.equal(sd["unused.weight"], model.unused.weight)


def test_inplace_shares_parameters() -> None:
    model = build("resnet18")
    gm = retrofit.retrofit(model, "se", input_size=64, inplace=True)
    assert gm.get_submodule("layer1.0.conv1").weight is model.layer1[0].conv1.weight


def test_new_modules_follow_model_dtype_and_mode() -> None:
    model = build("resnet18").double().eval()
    gm = retrofit.retrofit(model, "cbam", input_size=64)
    se = gm.get_submodule("layer1.0.cbam")
    assert all(p.dtype == torch.float64 for p in se.parameters())
    assert not se.training and not gm.training
    assert get_report(gm).max_abs_diff == 0.0


def test_timm_metadata_is_kept() -> None:
    model = cached("resnet50")
    gm = retrofit.retrofit(model, "se", input_size=64)
    assert gm.num_classes == 1000
    assert gm.pretrained_cfg == model.pretrained_cfg and gm.pretrained_cfg is not model.pretrained_cfg
    assert resolve_data_config(model=gm) == resolve_data_config(model=model)


def test_sigmoid_gate_is_reported_as_not_identity() -> None:
    report = get_report(retrofit.retrofit(cached("resnet18"), "se", gate="sigmoid", input_size=64))
    assert not report.identity_expected and report.identity_ok is None
    assert report.max_abs_diff > 0


def test_attn_args_override_rule_args() -> None:
    report = get_report(retrofit.retrofit(cached("resnet18"), "se", attn_args={"rd_ratio": 0.25}, input_size=64))
    assert report.rows[0].params == 2 * 64 * 16 + 16 + 64


def test_meta_device_model_retrofits_without_running() -> None:
    model = timm.create_model("resnet18", device="meta")
    gm = retrofit.retrofit(model, "se")
    report = get_report(gm)
    assert len(report.rows) == 8 and report.max_abs_diff is None
    assert gm.get_submodule("layer1.0.se").fc1.weight.device.type == "meta"


def test_model_without_sites_is_an_error() -> None:
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    with pytest.raises(SiteError, match=r"Sequential has no residual adds and no conv blocks"):
        retrofit.retrofit(mlp, "se", input_size=(3, 2, 2))


def test_non_nchw_add_is_skipped_with_reason() -> None:
    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.conv(x).flatten(2).transpose(1, 2)
            return t + self.lin(t)

    analysis = retrofit.analyze(Tokens(), input_size=8)
    assert [s.kind for s in analysis.sites] == ["conv-block"]
    assert [(c.qualname, c.reason) for c in analysis.skipped] == [("add", "not a 4-D NCHW tensor (shape [2, 64, 8])")]


def test_report_renders_and_serialises() -> None:
    report = get_report(retrofit.retrofit(cached("resnet18"), "eca", input_size=64))
    text = str(report)
    assert "parameters added" in text and "layer4.1.eca" in text and "exact identity" in text
    d = report.to_dict()
    assert d["params_added"] == 2 * 3 + 6 * 5 and d["sites_changed"] == 8 and len(d["sites"]) == 8


def test_stage_table_ignores_feature_info_naming_missing_modules() -> None:
    """timm's Twins lists feature modules ("block.0") it does not have; the report still works."""
    plain = retrofit.get_report(retrofit.retrofit(build("resnet18"), "se", input_size=64, verify=False))
    model = build("resnet18")
    model.feature_info = [{"module": "block.0", "num_chs": 64}, {"module": "nowhere", "num_chs": 64},
                          *model.feature_info]
    report = retrofit.get_report(retrofit.retrofit(model, "se", input_size=64, verify=False))
    assert report.stages == plain.stages
    assert [s.name for s in report.stages][:3] == ["conv1", "bn1", "layer1"]
