"""Retrofit a timm model with attention from Python and print the report.

    python examples/retrofit_timm.py                 # resnet50 + SE
    python examples/retrofit_timm.py convnext_tiny cbam
"""

from __future__ import annotations

import sys

import timm
import torch

import retrofit


def main(model_name: str = "resnet50", attn: str = "se") -> None:
    model = timm.create_model(model_name, pretrained=False)
    gm = retrofit.retrofit(model, attn=attn)
    report = retrofit.get_report(gm)
    print(report)

    # The result is an ordinary nn.Module: it trains like the original, and right after
    # the rewrite it computes exactly what the original computed.
    x = torch.randn(2, *report.input_size)
    with torch.no_grad():
        same = torch.equal(model.eval()(x), gm.eval()(x))
    print(f"\noutputs identical to the original: {same}")
    new = [n for n, _ in gm.named_parameters() if n.startswith(tuple(f"{r.module}." for r in report.rows))]
    print(f"new parameters to fine-tune: {len(new)} tensors, e.g. {new[:2]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
