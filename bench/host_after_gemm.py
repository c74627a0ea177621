"""What host-side work costs right after a large product, against the same work back to back.

Inside a model's pass every small step between two products (a check, a view, a hook, a tiny
torch op) runs just after a GEMM has swept the caches, so it costs far more than a loop of it
measures. This is why the fused scoring path's overhead (bench/score_end_to_end.py) is many
times what its per-call microbenchmarks add up to, and why it is cut by doing fewer distinct
steps per layer rather than by making each one faster.

Each case is timed in isolation (median over calls): "back to back" repeats it alone, "after
GEMM" runs a [516, 1728] x [1728, 1728] float32 product before each call (the product not timed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from canfast import ops

RESULTS = Path(__file__).parent / "results" / "host_after_gemm.json"


def median_micros(step, before=None, calls: int = 300) -> float:
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    a, b = torch.randn(516, 1728), torch.randn(1728, 1728)
    x = torch.randn(4, 129, 64).requires_grad_()
    w = torch.randn(32, 64)
    plan = ops.LinearPlan.of(w, backend="auto")
    cases = {
        "pure Python (a 200-term sum)": lambda: sum(i * i for i in range(200)),
        "one tiny torch op (x + 1)": lambda: x.detach() + 1,
        "F.linear on [4, 129, 64]": lambda: torch.nn.functional.linear(x, w),
        "ops.LinearPlan call on [4, 129, 64]": lambda: plan(x),
    }

    def gemm() -> None:
        torch.mm(a, b)

    rows = []
    for name, step in cases.items():
        for _ in range(20):
            step()
        alone = median_micros(step, calls=args.calls)
        after = median_micros(step, gemm, calls=args.calls)
        rows.append({"case": name, "back_to_back_us": alone, "after_gemm_us": after})
    print(f"{platform.machine()}, {torch.get_num_threads()} threads; median microseconds per call")
    print(f"{'case':40s} {'back to back':>13s} {'after GEMM':>11s} {'ratio':>6s}")
    for r in rows:
        alone, after = r["back_to_back_us"], r["after_gemm_us"]
        print(f"{r['case']:40s} {alone:13.1f} {after:11.1f} {after / alone:6.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    summary = {"threads": torch.get_num_threads(), "calls": args.calls, "rows": rows}
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
