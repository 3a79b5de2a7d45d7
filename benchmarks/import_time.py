"""What ``import retrofit`` costs beyond ``import torch``, measured in fresh processes.

Each round starts two interpreters: one imports torch, one imports torch then retrofit, and
each times its own imports (``time.perf_counter`` around the import statements, so the
interpreter's start-up is not counted). The target is at most 0.5 s over torch; the script
prints the medians, the difference and the ratio, and exits 1 when the difference is over
the target (``--target``). The modules retrofit imports lazily (sympy through torch's
symbolic shapes, timm, tabulate, the framework adapters) stay out of ``sys.modules``;
the script lists which of them an import pulled in.

    python benchmarks/import_time.py            # 7 rounds
    python benchmarks/import_time.py --rounds 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
if {retrofit}:
    import retrofit
t2 = time.perf_counter()
heavy = [m for m in ("sympy", "timm", "tabulate", "ultralytics", "transformers") if m in sys.modules]
print(json.dumps({{"torch": t1 - t0, "retrofit": t2 - t1, "heavy": heavy}}))
"""


def _probe(with_retrofit: bool) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(retrofit=with_retrofit)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="fresh-process pairs to time (default 7)")
    p.add_argument("--target", type=float, default=0.5, help="seconds allowed over import torch (default 0.5)")
    args = p.parse_args(argv)
    torch_only, torch_then, extra, heavy = [], [], [], set()
    for _ in range(args.rounds):
        a, b = _probe(False), _probe(True)
        torch_only.append(float(a["torch"]))
        torch_then.append(float(b["torch"]) + float(b["retrofit"]))
        extra.append(float(b["retrofit"]))
        heavy.update(b["heavy"])  # type: ignore[arg-type]
    t, r, d = statistics.median(torch_only), statistics.median(torch_then), statistics.median(extra)
    print(f"import torch:            {t:.3f} s (median of {args.rounds})")
    print(f"import torch + retrofit: {r:.3f} s")
    print(f"retrofit over torch:     {d:.3f} s (target <= {args.target:.1f} s); ratio {r / t:.2f}x")
    print(f"heavy modules pulled in by import retrofit: {', '.join(sorted(heavy)) or 'none'}")
    return 0 if d <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
