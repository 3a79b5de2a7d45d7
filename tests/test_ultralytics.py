"""Ultralytics YOLO end to end: retrofit.ultralytics.trainer in YOLO.train, its checkpoints,
resume, reload in a fresh process, val, and ONNX export.

Tiny generated data sets (a few 64x64 images with coloured boxes), one epoch each, CPU,
``YOLO_OFFLINE=1``, ``amp=False``, ``plots=False``: nothing downloads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import retrofit
import retrofit.ultralytics
from retrofit.cli import main as cli_main

SIZE = 64
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def make_data(root: Path, task: str, n_train: int = 8, n_val: int = 4) -> Path:
    """Boxes of three colours on noise: YOLO labels (boxes or polygons) or class folders."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            img = (rng.random((SIZE, SIZE, 3)) * 60).astype(np.uint8)
            lines = []
            for _ in range(1 if task == "classify" else 2):
                c = int(rng.integers(0, 3))
                w, h = (int(v) for v in rng.integers(12, 28, 2))
                x0, y0 = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
                img[y0:y0 + h, x0:x0 + w] = COLOURS[c]
                if task == "segment":
                    pts = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
                    lines.append(f"{c} " + " ".join(f"{p / SIZE:.4f}" for p in pts))
                else:
                    lines.append(f"{c} {(x0 + w / 2) / SIZE:.4f} {(y0 + h / 2) / SIZE:.4f} {w / SIZE:.4f} {h / SIZE:.4f}")
            if task == "classify":
                folder = root / split / ["red", "green", "blue"][int(lines[0].split()[0])]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(folder / f"{i}.png")
                continue
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            (root / "labels" / split / f"{i}.txt").write_text("\n".join(lines) + "\n")
    if task == "classify":
        for split in ("train", "val"):  # every class in both splits
            for k, name in enumerate(["red", "green", "blue"]):
                folder = root / split / name
                if not folder.exists():
                    folder.mkdir(parents=True)
                    img = np.zeros((SIZE, SIZE, 3), np.uint8)
                    img[16:48, 16:48] = COLOURS[k]
                    Image.fromarray(img).save(folder / "0.png")
        return root
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\n"
                                    "names:\n  0: red\n  1: green\n  2: blue\n")
    return root / "data.yaml"


def train_args(project: Path, name: str, **extra: Any) -> dict[str, Any]:
    return {**dict(epochs=1, imgsz=SIZE, batch=4, workers=0, amp=False, plots=False, device="cpu",
                   project=str(project), name=name, exist_ok=True, verbose=False, optimizer="AdamW", lr0=0.01,
                   seed=0), **extra}


def attention_names(model: torch.nn.Module, attn: str = "cbam") -> list[str]:
    return [n for n, _ in model.named_parameters() if f".{attn}." in n]


def _out(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [t for t in torch.utils._pytree.tree_leaves(model(x)) if isinstance(t, torch.Tensor)]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("yolo")


@pytest.fixture(scope="module")
def detect_data(work: Path) -> Path:
    return make_data(work / "det", "detect")


@pytest.fixture(scope="module")
def plain_pt(work: Path) -> Path:
    """A YOLOv8n checkpoint without attention (3 classes): what a user's pretrained .pt is."""
    torch.manual_seed(0)
    model = retrofit.create_model("ultralytics:yolov8n.yaml", nc=3)
    return retrofit.ultralytics.save_checkpoint(model, work / "plain.pt")


@pytest.fixture(scope="module")
def detect_run(work: Path, detect_data: Path, plain_pt: Path) -> dict[str, Any]:
    """One epoch of YOLO.train from a plain checkpoint, with CBAM through the trainer."""
    from ultralytics import YOLO

    seen: dict[str, Any] = {}

    def at_start(trainer: Any) -> None:  # after get_model and the weights, before any step
        seen["start"] = [t.clone() for t in _out(trainer.model, seen["x"])]
        seen["optimizer"] = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        seen["groups"] = [(g.get("param_group"), g["weight_decay"], {id(p) for p in g["params"]})
                          for g in trainer.optimizer.param_groups]
        seen["attention"] = {n: p for n, p in trainer.model.named_parameters() if ".cbam." in n}

    seen["x"] = torch.rand(1, 3, SIZE, SIZE)
    yolo = YOLO(str(plain_pt))
    yolo.add_callback("on_pretrain_routine_end", at_start)
    yolo.train(data=str(detect_data), trainer=retrofit.ultralytics.trainer("cbam"), **train_args(work, "det"))
    seen["run"] = work / "det"
    return seen


def test_training_from_a_plain_checkpoint_starts_at_exact_identity(detect_run: dict[str, Any], plain_pt: Path) -> None:
    from ultralytics import YOLO

    plain = YOLO(str(plain_pt)).model.float()
    want = _out(plain, detect_run["x"])
    assert all(torch.equal(a, b) for a, b in zip(detect_run["start"], want, strict=True))
    # Every attention parameter is in the optimizer: conv weights in Ultralytics' "weight"
    # group (with weight decay), biases in "bias" (none).
    attention = detect_run["attention"]
    assert len(attention) == 24 and {id(p) for p in attention.values()} <= detect_run["optimizer"]
    groups = {name: ids for name, _, ids in detect_run["groups"]}
    decay = {name: wd for name, wd, _ in detect_run["groups"]}
    assert {id(p) for n, p in attention.items() if n.endswith("weight")} <= groups["weight"] and decay["weight"] > 0
    assert {id(p) for n, p in attention.items() if n.endswith("bias")} <= groups["bias"] and decay["bias"] == 0


def test_a_new_class_count_starts_where_plain_training_starts(work: Path, detect_data: Path) -> None:
    """From a checkpoint with 80 classes (COCO's yolov8n.pt) to 3, model.load rebuilds the
    class branch from the random generator: the attention's init must not shift those draws,
    so an identity run starts bit for bit where plain fine-tuning of the same seed starts."""
    from ultralytics import YOLO

    torch.manual_seed(0)
    coco = retrofit.ultralytics.save_checkpoint(retrofit.create_model("ultralytics:yolov8n.yaml"),
                                                work / "eighty-classes.pt")
    x = torch.rand(1, 3, SIZE, SIZE)
    starts = []
    for name, factory in (("plain80", None), ("gc80", retrofit.ultralytics.trainer("yolo-gc-backbone"))):
        seen: dict[str, Any] = {}
        yolo = YOLO(str(coco))
        yolo.add_callback("on_pretrain_routine_end", lambda t, seen=seen: seen.update(out=_out(t.model, x)))
        yolo.train(data=str(detect_data), trainer=factory, **train_args(work, name))
        starts.append(seen["out"])
    assert all(torch.equal(a, b) for a, b in zip(*starts, strict=True))


def test_checkpoints_hold_the_attention(detect_run: dict[str, Any]) -> None:
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(detect_run["run"] / "weights" / name, weights_only=False)
        model = ckpt.get("ema") or ckpt["model"]
        assert len(attention_names(model)) == 24, name


_FRESH = """
import os, sys, json, torch
os.environ["YOLO_OFFLINE"] = "1"
from ultralytics import YOLO
y = YOLO(sys.argv[1])
x = torch.load(sys.argv[2])
m = y.model.float().eval()
with torch.no_grad():
    out = m(x)[0]
fused = YOLO(sys.argv[1]).model.float().eval().fuse(verbose=False)
with torch.no_grad():
    out_fused = fused(x)[0]
metrics = y.val(data=sys.argv[3], imgsz=64, batch=4, device="cpu", plots=False, verbose=False, workers=0)
boxes = y.predict(sys.argv[4], imgsz=64, device="cpu", verbose=False, conf=0.0)[0].boxes
torch.save({"out": out, "fused": out_fused, "map": float(metrics.box.map), "boxes": boxes.data}, sys.argv[5])
print(sum(".cbam." in n for n, _ in m.named_parameters()))
"""


def test_a_fresh_process_loads_val_predicts_and_fuses_the_checkpoint(detect_run: dict[str, Any], detect_data: Path,
                                                                      work: Path) -> None:
    """YOLO("best.pt") in another process, with retrofit installed: the same numbers as here."""
    from ultralytics import YOLO

    best = detect_run["run"] / "weights" / "best.pt"
    x = torch.rand(1, 3, SIZE, SIZE)
    torch.save(x, work / "x.pt")
    image = next((detect_data.parent / "images" / "val").iterdir())
    r = subprocess.run([sys.executable, "-c", _FRESH, str(best), str(work / "x.pt"), str(detect_data), str(image),
                        str(work / "fresh.pt")], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                                   str(torch.get_num_threads())})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "24"
    fresh = torch.load(work / "fresh.pt")
    here = YOLO(str(best))
    model = here.model.float().eval()
    with torch.no_grad():
        assert torch.equal(model(x)[0], fresh["out"])
        fused = YOLO(str(best)).model.float().eval().fuse(verbose=False)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(fused(x)[0], fresh["fused"])
        torch.testing.assert_close(fresh["fused"], fresh["out"], rtol=1e-3, atol=1e-3)
    metrics = here.val(data=str(detect_data), imgsz=SIZE, batch=4, device="cpu", plots=False, verbose=False, workers=0)
    assert float(metrics.box.map) == fresh["map"]
    boxes = here.predict(str(image), imgsz=SIZE, device="cpu", verbose=False, conf=0.0)[0].boxes
    torch.testing.assert_close(boxes.data, fresh["boxes"])


def test_onnx_export_runs_in_onnxruntime(detect_run: dict[str, Any], work: Path) -> None:
    import onnxruntime as ort
    from ultralytics import YOLO

    best = detect_run["run"] / "weights" / "best.pt"
    onnx = YOLO(str(best)).export(format="onnx", imgsz=SIZE, simplify=False, dynamic=False)
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, SIZE, SIZE)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    model = YOLO(str(best)).model.float().eval().fuse(verbose=False)
    with torch.no_grad():
        want = model(x)[0]
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-3, atol=1e-3)


def test_training_from_a_retrofitted_checkpoint_loads_its_attention(work: Path, detect_data: Path) -> None:
    """The command line writes a retrofitted checkpoint (attention moved off identity here);
    the trainer inserts the same modules once and loads their weights."""
    from ultralytics import YOLO

    start = work / "cli.pt"
    assert cli_main(["ultralytics:yolov8n.yaml", "--attn", "cbam", "--input-size", "64", "--num-classes", "3",
                     "--out", str(start), "-q"]) == 0
    ckpt = torch.load(start, weights_only=False)
    with torch.no_grad():
        for n, p in ckpt["model"].named_parameters():
            if ".cbam." in n:
                p.add_(0.05)
    torch.save(ckpt, start)
    saved = {n: p.float().clone() for n, p in ckpt["model"].named_parameters() if ".cbam." in n}
    seen: dict[str, Any] = {}
    yolo = YOLO(str(start))
    assert len(attention_names(yolo.model)) == 24
    yolo.add_callback("on_pretrain_routine_end", lambda t: seen.update(
        {n: p.detach().clone() for n, p in t.model.named_parameters() if ".cbam." in n}))
    yolo.train(data=str(detect_data), trainer=retrofit.ultralytics.trainer("cbam"), **train_args(work, "again"))
    assert seen.keys() == saved.keys()  # inserted once: the same 24 tensors, no second set
    assert all(torch.equal(seen[n], saved[n]) for n in saved)


def test_resume_continues_a_stopped_run(work: Path, detect_data: Path, plain_pt: Path) -> None:
    from ultralytics import YOLO

    class Stop(Exception):
        pass

    def stop(trainer: Any) -> None:
        if trainer.epoch == 0:
            raise Stop

    yolo = YOLO(str(plain_pt))
    yolo.add_callback("on_fit_epoch_end", stop)
    tr = retrofit.ultralytics.trainer("se")
    with pytest.raises(Stop):
        yolo.train(data=str(detect_data), trainer=tr, **train_args(work, "resume", epochs=2))
    last = work / "resume" / "weights" / "last.pt"
    assert torch.load(last, weights_only=False)["epoch"] == 0
    YOLO(str(last)).train(resume=True, trainer=tr)
    ckpt = torch.load(last, weights_only=False)
    assert len(attention_names(ckpt.get("ema") or ckpt["model"], "se")) == 24
    rows = (work / "resume" / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # the header and both epochs


@pytest.mark.parametrize("task,yaml", [("segment", "yolov8n-seg.yaml"), ("classify", "yolov8n-cls.yaml")])
def test_segment_and_classify_trainers_keep_the_attention(task: str, yaml: str, work: Path) -> None:
    from ultralytics import YOLO

    data = make_data(work / task, task)
    YOLO(yaml).train(data=str(data), trainer=retrofit.ultralytics.trainer("eca"), **train_args(work, f"t-{task}"))
    ckpt = torch.load(work / f"t-{task}" / "weights" / "last.pt", weights_only=False)
    model = ckpt.get("ema") or ckpt["model"]
    assert len(attention_names(model, "eca")) == 6
    assert type(model).__name__ == {"segment": "SegmentationModel", "classify": "ClassificationModel"}[task]


def test_the_ema_trainer_keeps_its_attention(work: Path, detect_data: Path) -> None:
    """EMA through the trainer: on the residual branch of every backbone Bottleneck whose
    channels its 32 groups divide (model.2's 16-channel one is skipped, with why), an exact
    identity when training starts, and in last.pt after it."""
    from ultralytics import YOLO

    seen: dict[str, Any] = {"x": torch.rand(1, 3, SIZE, SIZE)}
    plain = retrofit.create_model("ultralytics:yolov8n.yaml", nc=3)

    def at_start(trainer: Any) -> None:  # after get_model and the weights, before any step
        seen["names"] = [n for n, _ in trainer.model.named_parameters() if ".ema." in n]
        plain.load_state_dict({k: v for k, v in trainer.model.state_dict().items() if ".ema." not in k})
        seen["same"] = all(torch.equal(a, b) for a, b in zip(_out(trainer.model, seen["x"]), _out(plain, seen["x"]),
                                                              strict=True))

    yolo = YOLO("yolov8n.yaml")
    yolo.add_callback("on_pretrain_routine_end", at_start)
    yolo.train(data=str(detect_data), trainer=retrofit.ultralytics.trainer("ema"), **train_args(work, "ema"))
    blocks = ["model.4.m.0", "model.4.m.1", "model.6.m.0", "model.6.m.1", "model.8.m.0"]
    assert seen["names"] == [f"{b}.ema.{p}" for b in blocks for p in ("gn.weight", "gn.bias", "conv1x1.weight",
                                                                    "conv1x1.bias", "conv3x3.weight", "conv3x3.bias")]
    assert seen["same"]
    ckpt = torch.load(work / "ema" / "weights" / "last.pt", weights_only=False)
    assert attention_names(ckpt.get("ema") or ckpt["model"], "ema") == seen["names"]
    skipped = retrofit.plan(plain, "ema", input_size=SIZE).skipped
    assert [(s.path, why.split(" (")[0]) for s, why in skipped] == [
        ("model.2.m.0", "ema: 16 channels are not divisible by factor = 32")]


def test_the_attention_learning_rate_multiplier(work: Path, detect_data: Path) -> None:
    factory = retrofit.ultralytics.trainer("se", lr_mult=10)
    trainer = factory.for_task("detect")(overrides=train_args(work, "lr", data=str(detect_data), model="yolov8n.yaml"))
    model = trainer.get_model(cfg="yolov8n.yaml", verbose=False)
    optimizer = trainer.build_optimizer(model, name="SGD", lr=0.01, momentum=0.9, decay=5e-4)
    attention = {id(p) for n, p in model.named_parameters() if ".se." in n}
    mine = [g for g in optimizer.param_groups if {id(p) for p in g["params"]} & attention]
    assert [(g["param_group"], g["lr"]) for g in mine] == [("weight", 0.1), ("bias", 0.1)]
    assert all({id(p) for p in g["params"]} <= attention for g in mine)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    with pytest.raises(retrofit.OptionError, match="lr_mult"):
        retrofit.ultralytics.trainer("se", lr_mult=0)


def test_the_trainer_passes_check_identity_through(work: Path, detect_data: Path) -> None:
    # The refusal of a module that is not an identity at init says "or pass
    # check_identity=False": the trainer takes that argument, as retrofit() does.
    from .attention_helpers import NotIdentity

    retrofit.register_attention("test_yolo_not_identity")(NotIdentity)
    try:
        rules = retrofit.parse_rules({"rule": [{"at": "residual-add", "attn": "test_yolo_not_identity"}]})
        args = train_args(work, "not-identity", data=str(detect_data), model="yolov8n.yaml")
        refused = retrofit.ultralytics.trainer(rules=rules).for_task("detect")(overrides=args)
        with pytest.raises(retrofit.AttentionError, match=r"is not an identity at init: .* or pass check_identity=False"):
            refused.get_model(cfg="yolov8n.yaml", verbose=False)
        factory = retrofit.ultralytics.trainer(rules=rules, check_identity=False)
        assert "check_identity=False" in repr(factory)
        model = factory.for_task("detect")(overrides=args).get_model(cfg="yolov8n.yaml", verbose=False)
        report = retrofit.get_report(model)
        assert len(report.rows) == 6 and report.identity_ok is False
    finally:
        retrofit.attention.unregister_attention("test_yolo_not_identity")


def _attention_runs_after_fuse(rules: str) -> None:
    """Ultralytics' fuse() (run by val, predict and export) keeps the attention: every
    inserted module still runs in the fused model's forward."""
    out = retrofit.retrofit(retrofit.create_model("ultralytics:yolov8n.yaml", nc=3), rules, input_size=SIZE).eval()
    inserted = [r.module for r in retrofit.get_report(out).rows]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in inserted:  # away from identity, so that skipping it would show in the output
            for p in out.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        x = torch.rand(1, 3, SIZE, SIZE)
        want = out(x)[0]
    ran: set[str] = set()
    for name in inserted:
        out.get_submodule(name).register_forward_hook(lambda *_, name=name: ran.add(name))
    with torch.no_grad():
        got = out.fuse(verbose=False)(x)[0]
    assert inserted and sorted(ran) == sorted(inserted)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)  # the folded norms round differently


def test_fuse_keeps_attention_at_the_bottleneck_adds() -> None:
    _attention_runs_after_fuse("cbam")


@pytest.mark.parametrize("rules", ["yolo-coord-backbone", "yolo-gc-backbone", "yolo-ema-backbone"])
def test_fuse_keeps_attention_inside_conv_blocks(rules: str) -> None:
    # fuse() folds each Conv block's BatchNorm into its convolution, deletes it and sets the
    # block's forward to forward_fuse, act(conv(x)), which skipped the attention inside.
    _attention_runs_after_fuse(rules)


@pytest.mark.parametrize("rules", ["cbam", "yolo-gc-backbone", "yolo-coord-backbone", "yolo-ema-backbone"])
def test_warm_up_bias_steps_alone_keep_identity(rules: str) -> None:
    # Ultralytics' warm-up starts every bias, the inserted modules' too, at lr 0.1
    # (docs/ultralytics.md): the identity is held by zero-initialised weights, not by biases.
    model = retrofit.retrofit(retrofit.create_model("ultralytics:yolov8n.yaml", nc=3), rules, input_size=SIZE).eval()
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    attention = {id(p) for p in retrofit.optim.attention_parameters(model)}
    with torch.no_grad():
        want = model(x)[0]
        biases = [p for n, p in model.named_parameters() if id(p) in attention and n.endswith("bias")]
        for p in biases:
            p.add_(0.1)
        got = model(x)[0]
    assert biases and (got - want).abs().max() <= 0.01 < want.abs().max()


def test_built_in_yolo_placements(work: Path) -> None:
    model = retrofit.create_model("ultralytics:yolov8n.yaml", nc=3)
    after = retrofit.get_report(retrofit.retrofit(model, "yolo-cbam-backbone", input_size=SIZE))
    assert [r.path for r in after.rows] == ["model.2.cv2.conv", "model.4.cv2.conv", "model.6.cv2.conv",
                                            "model.8.cv2.conv"]
    before = retrofit.get_report(retrofit.retrofit(model, "yolo-cbam-sppf", input_size=SIZE))
    assert [r.path for r in before.rows] == ["model.8.cv2.conv"] and before.max_abs_diff == 0.0
    plan = retrofit.plan(model, "yolo-cbam-sppf", input_size=SIZE)
    site = plan.placements[0].site
    assert "model.9 (SPPF)" in site.input_of and "model.8 (C2f)" in site.output_of
    assert {"yolo-cbam-backbone", "yolo-cbam-sppf"} <= set(retrofit.list_builtin_rules())


# GC on C channels, bottleneck r = C / 16: 2 C r + 2 C + 3 r + 1 (scoring conv, two linears,
# LayerNorm); coordinate attention, width m = max(8, C // 32): 3 C m + m + 2 C. C = 32, 64, 128, 256.
@pytest.mark.parametrize(("rules", "attn", "params"), [("yolo-gc-backbone", "gc", 199 + 653 + 2_329 + 8_753),
                                                       ("yolo-coord-backbone", "coord", 840 + 1_672 + 3_336 + 6_664)])
def test_attention_after_the_backbone_stages(rules: str, attn: str, params: int) -> None:
    """GCNet's placement (and coordinate attention's) for detectors: after each backbone stage."""
    model = retrofit.create_model("ultralytics:yolov8n.yaml", nc=3)
    report = retrofit.get_report(retrofit.retrofit(model, rules, input_size=SIZE))
    assert [(r.path, r.attn, r.channels, r.size) for r in report.rows] == [
        ("model.2.cv2.conv", attn, 32, (16, 16)), ("model.4.cv2.conv", attn, 64, (8, 8)),
        ("model.6.cv2.conv", attn, 128, (4, 4)), ("model.8.cv2.conv", attn, 256, (2, 2))]
    assert report.params_added == params and report.max_abs_diff == 0.0
    assert rules in retrofit.list_builtin_rules()


def test_the_checkpoints_report_the_attention_they_hold(detect_run: dict[str, Any], plain_pt: Path) -> None:
    """The trainer rewrites its model in place: the report still counts the model as it was."""
    plain = sum(p.numel() for p in torch.load(plain_pt, weights_only=False)["model"].parameters())
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(detect_run["run"] / "weights" / name, weights_only=False)
        model = ckpt.get("ema") or ckpt["model"]
        report = retrofit.get_report(model)
        cbam = sum(p.numel() for n, p in model.named_parameters() if ".cbam." in n)
        assert (report.params_before, report.params_after) == (plain, plain + cbam), name
        assert report.params_added == cbam == sum(r.params for r in report.rows) > 0


_WORKER_PROBE = """
    import json
    trainer.setup_model()  # what a worker's _setup_train does first
    model = trainer.model
    attention = {id(p) for n, p in model.named_parameters() if ".cbam." in n}
    optimizer = trainer.build_optimizer(model, name="SGD", lr=0.01, momentum=0.9, decay=5e-4)
    lrs = sorted({g["lr"] for g in optimizer.param_groups if {id(p) for p in g["params"]} & attention})
    print(json.dumps({"trainer": type(trainer).__name__, "attention": len(attention), "lrs": lrs,
                      "added": __import__("retrofit").get_report(model).params_added}))
"""


def test_a_multi_gpu_worker_rebuilds_the_trainer_with_its_attention(work: Path, detect_data: Path, plain_pt: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Multi-GPU ``YOLO.train`` starts its workers from a file Ultralytics writes: the file
    written by Ultralytics' own function, run in a fresh process up to the training loop
    (on the CPU: its DDP set-up needs GPUs), builds our trainer with its attention and
    learning-rate groups."""
    import logging

    from ultralytics import YOLO
    from ultralytics.utils.dist import ddp_cleanup, generate_ddp_file

    yolo = YOLO(str(plain_pt))
    factory = retrofit.ultralytics.trainer("cbam", lr_mult=10)
    overrides = {**train_args(work, "ddp", data=str(detect_data), model=str(plain_pt)), "mode": "train",
                 "task": "detect"}
    trainer = factory(overrides=overrides)
    with caplog.at_level(logging.INFO, logger="ultralytics"):
        trainer.model = trainer.get_model(weights=yolo.model, cfg=yolo.model.yaml)  # as YOLO.train does
    # The training log says what went in, in one line.
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrofit:")]
    added = retrofit.get_report(trainer.model).params_added
    assert said == [f"retrofit: cbam attention inserted at 6 sites; parameters 3,011,433 -> {3_011_433 + added:,} "
                    f"(+{added:,}, +{100 * added / 3_011_433:.2f}%)"]
    file = generate_ddp_file(trainer)
    try:
        script = Path(file).read_text()
        assert script.count("trainer.train()") == 1
        probe = work / "ddp_probe.py"
        probe.write_text(script.replace("    trainer.train()", _WORKER_PROBE))
        r = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "YOLO_OFFLINE": "1"})
    finally:
        ddp_cleanup(trainer, file)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"trainer": "RetrofitDetectionTrainer", "attention": 24, "lrs": [0.1], "added": added}


def test_the_declared_ultralytics_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    import tomllib
    from importlib import metadata

    extra = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    floor = ".".join(map(str, retrofit.ultralytics.FIRST_VERSION))
    assert extra["project"]["optional-dependencies"]["ultralytics"] == [f"ultralytics>={floor}"]
    monkeypatch.setattr(metadata, "version", lambda name: "8.4.139")
    with pytest.raises(retrofit.ModelLoadError, match=r"needs ultralytics >= 8\.4\.140 \(found 8\.4\.139\).*"
                                                     r"pip install -U 'ultralytics>=8\.4\.140'"):
        retrofit.ultralytics.trainer("se")


def test_diff_on_an_ultralytics_checkpoint_says_what_it_is(plain_pt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One line that names the file's kind and how to read it; torch's colour codes gone."""
    assert cli_main(["diff", str(plain_pt), str(plain_pt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err and "\\x1b" not in err and "\\n" not in err
    assert err.startswith(f"retrofit diff: error: cannot read training checkpoint '{plain_pt}': it is an Ultralytics "
                          "checkpoint (a pickle of ultralytics.nn.tasks.DetectionModel, which runs code when read)")
    assert "retrofit.create_model('ultralytics:PATH', trust_code=True)" in err
