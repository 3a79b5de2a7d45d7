"""The README's frameworks table: one representative model per library, each cell measured.

For YOLOv8n (Ultralytics), ResNet-50 (transformers) and a U-Net on ResNet-34 (smp), built
from their configs with random weights: retrofit ``se`` (sites changed), the identity check
(max |Δoutput| at init), a train step (loss finite, gradients reach the attention), a save
loaded again without trust_code (max |Δoutput|), and ONNX export run in onnxruntime (max
|Δoutput| against PyTorch). Writes ``docs/frameworks/table.md``.

    python scripts/framework_table.py
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import retrofit

MODELS = [
    ("Ultralytics YOLO", "YOLOv8n detect", "ultralytics:yolov8n.yaml", {}, 224),
    ("Hugging Face transformers", "ResNet-50", "transformers:ResNetForImageClassification", {"num_labels": 10}, 224),
    ("segmentation_models_pytorch", "U-Net, ResNet-34", "smp:Unet", {"encoder_name": "resnet34", "classes": 2}, 224),
]


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))


def measure(spec: str, kwargs: dict[str, Any], size: int) -> dict[str, str]:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = retrofit.create_model(spec, **kwargs).eval()
    out = retrofit.retrofit(model, "se", input_size=size)
    report = retrofit.get_report(out)
    cells = {"retrofit": f"{len(report.rows)} sites, +{report.params_added:,} params",
             "identity": f"max Δ {report.max_abs_diff:g}"}
    x = torch.randn(2, 3, size, size)
    out.train()
    loss = sum(t.float().mean() for t in _leaves(out(x)))
    loss.backward()
    new = [p for n, p in out.named_parameters() if any(n.startswith(f"{r.module}.") for r in report.rows)]
    cells["train"] = f"{sum(p.grad is not None for p in new)}/{len(new)} get gradients"
    out.eval()
    with torch.no_grad():
        for p in new:
            p.add_(torch.randn_like(p) * 0.01)
        want = _leaves(out(x))
    with tempfile.TemporaryDirectory() as tmp:
        retrofit.save(out, Path(tmp) / "save")
        with torch.no_grad():
            got = _leaves(retrofit.load(Path(tmp) / "save").eval()(x))
    cells["save/load"] = f"max Δ {_diff(want, got):g}"
    try:
        program = torch.onnx.export(out, (x,), dynamo=True, verbose=False)
        session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        onnx = [torch.from_numpy(o) for o in session.run(None, {session.get_inputs()[0].name: x.numpy()})]
        cells["ONNX"] = f"max Δ {_diff(want, onnx):.1g}"
    except Exception as e:  # noqa: BLE001 (recorded in the table)
        cells["ONNX"] = f"fails: {type(e).__name__}"
    return cells


def main() -> None:
    from tabulate import tabulate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/frameworks/table.md"))
    args = p.parse_args()
    warnings.simplefilter("ignore")
    rows = []
    for library, what, spec, kwargs, size in MODELS:
        cells = measure(spec, kwargs, size)
        rows.append([library, f"{what} (`{spec}`)", *cells.values()])
        print(rows[-1], flush=True)
    headers = ["library", "model", "retrofit (se)", "identity at init", "train step", "save → load", "ONNX export"]
    table = tabulate(rows, headers=headers, tablefmt="github")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"{table}\n\nMeasured by `python scripts/framework_table.py` ({size}x{size} input, random "
                        "weights, CPU).\n")
    print(table)


if __name__ == "__main__":
    main()
