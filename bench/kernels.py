"""Kernel benchmarks: the cpp backend against the torch reference and against the machine's own
ceilings, plus the GPU roofline of the Triton kernels on paper.

    python bench/kernels.py            # full run (about 2-3 minutes on a 2-core CPU)
    python bench/kernels.py --quick    # tiny shapes, a smoke test of the script itself

Prints a table and writes ``bench/results/kernels.json`` (atomically). Every speed is a ratio
taken within one run: variants are timed in interleaved rounds, so load from other processes
hits them alike, and the median of the rounds is kept.

(a) score_accumulate, cpp vs the torch reference, and its read bandwidth as a fraction of a
    same-size copy's bandwidth (bytes read + written by ``Tensor.copy_``) timed in the same run.
(b) masked_linear forward + backward (masks, bias, dL/dx) vs the unmasked
    ``x @ W.T`` and its input-gradient product ``dy @ W``: the price of the fusion around BLAS.
(c) Roofline on paper of each Triton kernel at LLaVA-7b shapes on an H100-class GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from canfast import ops
from canfast.ops import reference

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"

# GPU figures the roofline uses (H100 SXM class): HBM bandwidth and dense bf16 tensor-core rate,
# and the fp32 rate of the CUDA cores, which is what elementwise work runs on.
GPU_BYTES_PER_S = 3.0e12
GPU_TENSOR_FLOPS = 800e12
GPU_VECTOR_FLOPS = 60e12

# LLaVA-1.5-7b's language model (Vicuna-7b): hidden and FFN sizes, ~600 tokens per sample
# (576 image tokens plus the prompt), a batch of 8.
HIDDEN, INTERMEDIATE, TOKENS, BATCH = 4096, 11008, 600, 8


def timed_rounds(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each variant over ``rounds`` interleaved rounds (after one warm-up)."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> dict:
    from canfast import _C

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "isa": _C.isa(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# ----------------------------------------------------------------------------------------------
# (a) score_accumulate


def _score_case(a: torch.Tensor, g: torch.Tensor, alpha: float, rounds: int) -> dict:
    out = torch.zeros(a.shape[0], 3, a.shape[2])
    src = torch.cat([a.flatten(), g.flatten()])  # the same bytes the kernel reads
    dst = torch.empty_like(src)
    read = src.numel() * src.element_size()
    t = timed_rounds(
        {
            "copy": lambda: dst.copy_(src),
            "cpp": lambda: ops.score_accumulate(a, g, alpha, out, backend="cpp"),
            "torch": lambda: reference.score_accumulate(a, g, alpha, out),
        },
        rounds,
    )
    copy_bw = 2 * read / t["copy"]
    return {
        "op": "score_accumulate",
        "threads": torch.get_num_threads(),
        "shape": list(a.shape),
        "dtype": str(a.dtype).removeprefix("torch."),
        "alpha": alpha,
        "cpp_s": t["cpp"],
        "torch_s": t["torch"],
        "speedup_vs_torch": t["torch"] / t["cpp"],
        "cpp_read_GBps": read / t["cpp"] / 1e9,
        "copy_GBps": copy_bw / 1e9,
        "fraction_of_copy_bw": read / t["cpp"] / copy_bw,
    }


def bench_score(rows: int, channels: int, samples: int, rounds: int) -> list[dict]:
    """alpha = 0.5 (the default, a fast path) and 0.3 (the general power), with torch's thread
    count and, where that is more than one, again on one thread: one core's stream is the
    fraction that a busy neighbour core (a shared machine) cannot distort."""
    results = []
    threads = torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(samples, rows // samples, channels).to(dtype)
        g = (torch.randn(samples, rows // samples, channels) * 1e-3).to(dtype)
        for count in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(count)
            try:
                results += [_score_case(a, g, alpha, rounds) for alpha in (0.5, 0.3)]
            finally:
                torch.set_num_threads(threads)
    return results


# ----------------------------------------------------------------------------------------------
# (b) masked_linear forward + backward


def _linear_case(rows: int, k: int, n: int, dtype: torch.dtype, rounds: int) -> dict:
    x = torch.randn(rows, k).to(dtype)
    w = (torch.randn(n, k) * k**-0.5).to(dtype)
    bias = torch.randn(n).to(dtype)
    grad_y = torch.randn(rows, n).to(dtype)
    # About 1% of the neurons masked on each side, as a sweep's masks are.
    out_mask = (torch.rand(n) > 0.01).float()
    in_mask = (torch.rand(k) > 0.01).float()
    x_leaf = x.clone().requires_grad_()

    def plain() -> None:
        x @ w.t()
        grad_y @ w

    def fused() -> None:
        x_leaf.grad = None
        y = ops.masked_linear(x_leaf, w, bias, out_mask, in_mask, backend="cpp")
        y.backward(grad_y)

    t = timed_rounds({"plain": plain, "cpp": fused}, rounds)
    flops = 2 * 2 * rows * k * n
    return {
        "op": "masked_linear fwd+bwd",
        "shape": [rows, k, n],
        "dtype": str(dtype).removeprefix("torch."),
        "cpp_s": t["cpp"],
        "plain_matmuls_s": t["plain"],
        "ratio_vs_plain": t["cpp"] / t["plain"],
        "plain_GFLOPs": flops / t["plain"] / 1e9,
        "cpp_GFLOPs": flops / t["cpp"] / 1e9,
    }


def bench_masked_linear(rows: int, k: int, n: int, rounds: int) -> list[dict]:
    return [_linear_case(rows, k, n, dtype, rounds) for dtype in (torch.bfloat16, torch.float32)]


# ----------------------------------------------------------------------------------------------
# (c) GPU roofline on paper


def _roofline(name: str, shape: str, bytes_moved: float, flops: float, tensor: bool) -> dict:
    rate = GPU_TENSOR_FLOPS if tensor else GPU_VECTOR_FLOPS
    t_mem, t_math = bytes_moved / GPU_BYTES_PER_S, flops / rate
    return {
        "kernel": name,
        "shape": shape,
        "bytes": bytes_moved,
        "flops": flops,
        "flops_per_byte": flops / bytes_moved,
        "memory_us": t_mem * 1e6,
        "math_us": t_math * 1e6,
        "predicted_us": max(t_mem, t_math) * 1e6,
        "bound": "memory" if t_mem >= t_math else "compute",
    }


def gpu_roofline() -> list[dict]:
    """Bytes and FLOPs of each Triton kernel at LLaVA-7b shapes, bf16, one FFN layer."""
    e = 2  # bf16
    rows = TOKENS * BATCH
    table = []
    for channels, what in ((INTERMEDIATE, "gate/up out, mid"), (HIDDEN, "down out")):
        # Reads a and g once; per element |a|, |g|, sqrt, fma, two adds (~6 vector FLOPs).
        table.append(
            _roofline(
                "score_accumulate",
                f"[{BATCH}x{TOKENS}, {channels}] ({what})",
                2 * rows * channels * e + 2 * BATCH * 3 * channels * 4,
                6 * rows * channels,
                tensor=False,
            )
        )
    for k, n, what in ((HIDDEN, INTERMEDIATE, "gate/up"), (INTERMEDIATE, HIDDEN, "down")):
        # Forward: x, W, y once each (masks are O(K + N)); backward dL/dx the same
        # product with the roles of K and N exchanged.
        table.append(
            _roofline(
                "masked_linear fwd",
                f"[{rows}, {k}] @ [{k}, {n}] ({what})",
                (rows * k + k * n + rows * n) * e,
                2 * rows * k * n,
                tensor=True,
            )
        )
        table.append(
            _roofline(
                "masked_linear bwd (dL/dx)",
                f"[{rows}, {n}] @ [{n}, {k}] ({what})",
                (rows * n + k * n + rows * k) * e,
                2 * rows * k * n,
                tensor=True,
            )
        )
    # ablate_expand in a single-neuron scan: one sample's down output, 64 neurons per batch.
    copies, positions = 64, TOKENS
    out_bytes = copies * positions * HIDDEN * e
    table.append(
        _roofline(
            "ablate_expand (unit out)",
            f"{copies} x [{positions}, {HIDDEN}]",
            positions * HIDDEN * e + out_bytes,
            0.0,
            tensor=False,
        )
    )
    table.append(
        _roofline(
            "ablate_expand (unit mid)",
            f"{copies} x [{positions}, {HIDDEN}], K={INTERMEDIATE}",
            positions * HIDDEN * e + out_bytes + copies * (positions + HIDDEN) * e,
            2 * copies * positions * HIDDEN,
            tensor=False,
        )
    )
    return table


# ----------------------------------------------------------------------------------------------


Column = tuple[str, Callable[[dict], str]]


def _print_table(title: str, rows: list[dict], columns: list[Column]) -> None:
    cells = [[fmt(row) for _, fmt in columns] for row in rows]
    widths = [max(len(label), *(len(r[i]) for r in cells)) for i, (label, _) in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(label.rjust(w) for (label, _), w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: smoke test")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if not ops.available("cpp"):
        print("canfast._C is not built: nothing to benchmark", file=sys.stderr)
        return 1

    if args.quick:
        rounds = args.rounds or 2
        score = bench_score(rows=256, channels=1000, samples=2, rounds=rounds)
        linear = bench_masked_linear(rows=64, k=512, n=256, rounds=rounds)
    else:
        rounds = args.rounds or 7
        score = bench_score(rows=4096, channels=INTERMEDIATE, samples=8, rounds=rounds)
        linear = bench_masked_linear(
            rows=2048, k=INTERMEDIATE, n=HIDDEN, rounds=max(3, rounds // 2)
        )
    roofline = gpu_roofline()

    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), _C isa {info['isa']}; medians of {rounds} rounds"
    )
    shape = lambda r: "x".join(map(str, r["shape"]))  # noqa: E731
    _print_table(
        "(a) score_accumulate: cpp vs torch reference; read bandwidth vs a same-size copy",
        score,
        [
            ("shape", shape),
            ("dtype", lambda r: r["dtype"]),
            ("threads", lambda r: str(r["threads"])),
            ("alpha", lambda r: f"{r['alpha']:g}"),
            ("cpp ms", lambda r: f"{r['cpp_s'] * 1e3:.1f}"),
            ("torch ms", lambda r: f"{r['torch_s'] * 1e3:.1f}"),
            ("speedup", lambda r: f"{r['speedup_vs_torch']:.1f}x"),
            ("read GB/s", lambda r: f"{r['cpp_read_GBps']:.1f}"),
            ("copy GB/s (r+w)", lambda r: f"{r['copy_GBps']:.1f}"),
            ("of copy bw", lambda r: f"{r['fraction_of_copy_bw']:.2f}"),
        ],
    )
    _print_table(
        "(b) masked_linear fwd+bwd (masks, bias, dL/dx) vs plain x @ W.T and dy @ W",
        linear,
        [
            ("R x K x N", shape),
            ("dtype", lambda r: r["dtype"]),
            ("cpp s", lambda r: f"{r['cpp_s']:.3f}"),
            ("plain s", lambda r: f"{r['plain_matmuls_s']:.3f}"),
            ("ratio", lambda r: f"{r['ratio_vs_plain']:.3f}"),
            ("plain GFLOP/s", lambda r: f"{r['plain_GFLOPs']:.1f}"),
            ("cpp GFLOP/s", lambda r: f"{r['cpp_GFLOPs']:.1f}"),
        ],
    )
    _print_table(
        f"(c) GPU roofline on paper, bf16: {GPU_BYTES_PER_S / 1e12:.1f} TB/s, "
        f"{GPU_TENSOR_FLOPS / 1e12:.0f} TFLOP/s tensor cores, "
        f"{GPU_VECTOR_FLOPS / 1e12:.0f} TFLOP/s fp32 vector",
        roofline,
        [
            ("kernel", lambda r: r["kernel"]),
            ("shape", lambda r: r["shape"]),
            ("MB", lambda r: f"{r['bytes'] / 1e6:.1f}"),
            ("GFLOP", lambda r: f"{r['flops'] / 1e9:.2f}"),
            ("flop/byte", lambda r: f"{r['flops_per_byte']:.1f}"),
            ("memory us", lambda r: f"{r['memory_us']:.1f}"),
            ("math us", lambda r: f"{r['math_us']:.1f}"),
            ("predicted us", lambda r: f"{r['predicted_us']:.1f}"),
            ("bound", lambda r: r["bound"]),
        ],
    )
    payload = {
        "machine": info,
        "rounds": rounds,
        "quick": args.quick,
        "score_accumulate": score,
        "masked_linear": linear,
        "gpu_roofline": {
            "bytes_per_s": GPU_BYTES_PER_S,
            "tensor_flops": GPU_TENSOR_FLOPS,
            "vector_flops": GPU_VECTOR_FLOPS,
            "kernels": roofline,
        },
    }
    _write_json(args.out, payload)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
