"""The command line: ``retrofit MODEL --attn NAME``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import RetrofitError

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_IDENTITY_FAILED, EXIT_USAGE = 0, 1, 2


def _input_size(text: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(v) for v in text.lower().replace("x", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use 224, 224x224 or 3x224x224") from None
    if len(parts) not in (1, 2, 3) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use 224, 224x224 or 3x224x224")
    return parts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="retrofit",
        description="Add identity-initialized attention to a CNN and print the before/after diff.",
        epilog="example: retrofit resnet50 --attn cbam",
    )
    p.add_argument("model", help="timm model name, torchvision:NAME, or path/to/file.py:factory")
    p.add_argument("--attn", default="se", help="built-in rule set: se, eca, cbam (default: se)")
    p.add_argument("--rules", metavar="FILE", help="rule file (TOML); overrides --attn")
    p.add_argument("--gate", choices=("identity", "sigmoid"), help="gate form for every rule")
    p.add_argument("--input-size", type=_input_size, metavar="SIZE", help="224, 224x224 or 3x224x224")
    p.add_argument("--num-classes", type=int, help="classifier size of the built model")
    p.add_argument("--pretrained", action="store_true", help="download pretrained weights")
    p.add_argument("--leaf-module", action="append", default=[], metavar="NAME",
                   help="class name or module path not to trace into (repeatable)")
    p.add_argument("--sites", action="store_true", help="add a row per inserted module")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .api import get_report, retrofit
        from .models import create_model

        model = create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes)
        gm = retrofit(
            model,
            args.attn,
            rules=args.rules,
            gate=args.gate,
            input_size=args.input_size,
            leaf_modules=args.leaf_module,
        )
    except RetrofitError as e:
        if args.debug:
            raise
        print(f"retrofit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    report = get_report(gm)
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary())
        if args.sites:
            print()
            print(report.site_table())
    return EXIT_IDENTITY_FAILED if report.identity_ok is False else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
