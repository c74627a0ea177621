"""Regenerate the predicted-time tables of ``bench/roofline_triton.md`` from the AOT report.

    python bench/roofline_triton.py

Reads the rows ``bench/aot.py`` wrote (``bench/results/aot.json``: each kernel's autotune
configs compiled for sm_80 and sm_90 by ``canfast.kernels.report``) and predicts each kernel's
time at LLaVA-1.5-7b shapes on A100 and H100 from bytes, FLOPs and the compiled occupancy:
programs resident per SM (registers and shared memory), waves of the grid, operand traffic from
L2, and for memory-bound kernels the bytes each SM keeps in flight against what the
bandwidth-latency product needs. The autotuner's pick is modelled as the
config with the best prediction among those that compile cleanly. Then it predicts end-to-end
times on one H100 for scoring, a 64-point sweep and the full single-neuron scan.

Only the text between the ``<!-- aot:begin -->`` and ``<!-- aot:end -->`` markers is rewritten;
prose outside them is kept as it is.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from canfast.kernels import report

DOC = Path(__file__).resolve().parent / "roofline_triton.md"
BEGIN, END = "<!-- aot:begin -->", "<!-- aot:end -->"


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: str
    sms: int
    tensor_flops: float  # dense bf16 tensor-core rate, FLOP/s
    bytes_per_s: float  # HBM bandwidth
    clock_hz: float
    latency_s: float = 600e-9  # loaded DRAM latency a load must cover


GPUS = (
    Gpu("A100 SXM4 80GB", "sm_80", 108, 312e12, 2.039e12, 1.41e9),
    Gpu("H100 SXM5 80GB", "sm_90", 132, 989e12, 3.35e12, 1.83e9),
)
# Operand bytes an SM can take from L2 per clock: a tile of BM x BN outputs reads
# (BM + BN) x BK operand elements per BK step, so small tiles are bound by this, not by the
# tensor cores.
L2_BYTES_PER_CLOCK_PER_SM = 64
# The fraction of HBM bandwidth a streaming kernel reaches at best (copy benchmarks).
HBM_EFFICIENCY = 0.9
# Warps per SM that keep the tensor cores issuing: two programs of 4 warps (or one of 8)
# hide the latency of the operand loads behind the pipelined mma/wgmma.
SATURATING_WARPS = 8
BF16 = 2

# LLaVA-1.5-7b: Vicuna-7b language model, CLIP ViT-L/14-336 vision tower.
HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 4096, 11008, 32, 32064
VISION_HIDDEN, VISION_INTERMEDIATE, VISION_LAYERS, VISION_TOKENS = 1024, 4096, 24, 577
TOKENS, BATCH, TARGET_TOKENS = 640, 8, 10  # 576 image tokens + prompt + answer per sample
ROWS = TOKENS * BATCH


RESULTS = Path(__file__).resolve().parent / "results" / "aot.json"
# The variants the predictions read: the heaviest epilogue of each masked_linear direction (an
# upper bound on the registers of the lighter ones), alpha = 0.5 with padding for the score.
FORWARD, BACKWARD = "fwd bias in=2 out=2", "bwd in=2 out=2 score valid alpha=1"
SCORE = "valid alpha=1"


def load_rows() -> list[report.Row]:
    """The rows of the last ``bench/aot.py`` run (subset ``heavy`` or larger)."""
    names = [f.name for f in fields(report.Row)]
    data = json.loads(RESULTS.read_text())
    return [report.Row(**{n: r[n] for n in names if n in r}) for r in data["rows"]]


def _ok(rows, kernel, arch, variant):
    return [
        r
        for r in rows
        if r.kernel == kernel
        and r.arch == arch
        and r.variant == variant
        and r.dtype == "bf16"
        and not r.problems
        and not r.pruned
    ]


def _blocks(config: str) -> list[int]:
    return [int(v) for v in config.split()[0].split("x")]


def matmul_time(gpu: Gpu, row: report.Row, m: int, n: int, k: int) -> float:
    """Seconds for ``[m, k] @ [k, n]`` with this compiled config: waves of tiles over the SMs,
    each SM's tensor rate shared by its resident programs and derated below the saturating
    warp count, or its operand traffic from L2, or the bytes of x, W and y over HBM, whichever
    is longest."""
    bm, bn, _ = _blocks(row.config)
    per_sm = max(row.warps_per_sm // row.num_warps, 1)
    tiles = math.ceil(m / bm) * math.ceil(n / bn)
    waves = math.ceil(tiles / (gpu.sms * per_sm))
    rate = gpu.tensor_flops / gpu.sms * min(1.0, row.warps_per_sm / SATURATING_WARPS)
    compute = waves * per_sm * 2 * bm * bn * k / rate
    operands = waves * per_sm * (bm + bn) * k * BF16
    l2 = operands / (L2_BYTES_PER_CLOCK_PER_SM * gpu.clock_hz)
    memory = (m * k + n * k + m * n) * BF16 / (gpu.bytes_per_s * HBM_EFFICIENCY)
    return max(compute, l2, memory)


def stream_time(gpu: Gpu, row: report.Row, nbytes: float, programs: int, in_flight: int) -> float:
    """Seconds to move ``nbytes`` with ``programs`` programs, each keeping ``in_flight`` bytes
    outstanding: full bandwidth only when the SMs hold enough bytes in flight to cover the
    latency (Little's law), and only on the SMs the grid fills."""
    per_sm = max(row.warps_per_sm // row.num_warps, 1)
    resident = min(per_sm, programs / gpu.sms)
    needed = gpu.bytes_per_s * gpu.latency_s / gpu.sms
    fraction = min(1.0, resident * in_flight / needed)
    return nbytes / (gpu.bytes_per_s * HBM_EFFICIENCY * fraction)


def best(times: dict[str, float]) -> tuple[str, float]:
    config = min(times, key=times.get)
    return config, times[config]


def kernel_tables(rows: list[report.Row]) -> tuple[str, dict]:
    """Markdown tables of predicted kernel times, and the H100 times the end-to-end model uses."""
    cases = []
    for label, variant, m, n, k in (
        ("forward `gate` / `up`", FORWARD, ROWS, INTERMEDIATE, HIDDEN),
        ("forward `down`", FORWARD, ROWS, HIDDEN, INTERMEDIATE),
        ("backward `dL/dx` of `gate` / `up`", BACKWARD, ROWS, HIDDEN, INTERMEDIATE),
        ("backward `dL/dx` of `down`", BACKWARD, ROWS, INTERMEDIATE, HIDDEN),
    ):
        cases.append(("masked_linear", label, variant, m, n, k))
    lines = [
        "| kernel | case | GPU | config (autotune's pick) | regs | warps/SM | predicted | "
        "ideal (peak rate) | of ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    h100 = {}
    for kernel, label, variant, m, n, k in cases:
        for gpu in GPUS:
            candidates = {r.config: r for r in _ok(rows, kernel, gpu.arch, variant)}
            times = {c: matmul_time(gpu, r, m, n, k) for c, r in candidates.items()}
            config, t = best(times)
            ideal = max(
                2 * m * n * k / gpu.tensor_flops, (m * k + n * k + m * n) * BF16 / gpu.bytes_per_s
            )
            r = candidates[config]
            lines.append(
                f"| {kernel} | {label} | {gpu.name.split()[0]} | {config} | {r.registers} | "
                f"{r.warps_per_sm} | {t * 1e6:.0f} µs | {ideal * 1e6:.0f} µs | {ideal / t:.0%} |"
            )
            if gpu.arch == "sm_90":
                h100[(kernel, label)] = (t, 2 * m * n * k)
    for c in (INTERMEDIATE, HIDDEN):
        nbytes = 2 * BATCH * TOKENS * c * BF16 + 2 * BATCH * 3 * c * 4 + BATCH * TOKENS
        for gpu in GPUS:
            candidates = {r.config: r for r in _ok(rows, "score_accumulate", gpu.arch, SCORE)}
            times = {}
            for config, r in candidates.items():
                bt, bc = _blocks(config)
                programs = BATCH * math.ceil(c / bc)
                times[config] = stream_time(gpu, r, nbytes, programs, 2 * bt * bc * BF16)
            config, t = best(times)
            r = candidates[config]
            ideal = nbytes / gpu.bytes_per_s
            lines.append(
                f"| score_accumulate | C = {c}, alpha = 0.5 | {gpu.name.split()[0]} | {config} | "
                f"{r.registers} | {r.warps_per_sm} | {t * 1e6:.0f} µs | {ideal * 1e6:.0f} µs | "
                f"{ideal / t:.0%} |"
            )
            if gpu.arch == "sm_90":
                h100[("score_accumulate", c)] = (t, nbytes)
    for unit in ("out", "mid"):
        for copies, positions in ((16, ROWS), (64, TOKENS)):
            n = HIDDEN
            nbytes = (copies + 1) * positions * n * BF16
            if unit == "mid":
                nbytes += copies * (positions + n) * 32
            for gpu in GPUS:
                candidates = {
                    r.config: r for r in _ok(rows, "ablate_expand", gpu.arch, f"unit={unit}")
                }
                times = {}
                for config, r in candidates.items():
                    bp, bn = _blocks(config)
                    tiles = math.ceil(positions / bp) * math.ceil(n / bn)
                    groups = min(copies, max(1, math.ceil(4 * gpu.sms / tiles)))
                    times[config] = stream_time(gpu, r, nbytes, tiles * groups, bp * bn * BF16)
                config, t = best(times)
                r = candidates[config]
                ideal = nbytes / gpu.bytes_per_s
                lines.append(
                    f"| ablate_expand | unit {unit}, n = {copies}, P = {positions}, N = {n} | "
                    f"{gpu.name.split()[0]} | {config} | {r.registers} | {r.warps_per_sm} | "
                    f"{t * 1e6:.0f} µs | {ideal * 1e6:.0f} µs | {ideal / t:.0%} |"
                )
                if gpu.arch == "sm_90" and copies == 64:
                    h100[("ablate_expand", unit)] = (t / copies, nbytes / copies)
    return "\n".join(lines), h100


def end_to_end(h100: dict) -> str:
    """Predicted H100 times of the three runs, from the kernel predictions above."""
    gpu = GPUS[1]
    # The achieved tensor-core rate of masked_linear at these shapes, applied to every matmul
    # of the model (the attention projections run in cuBLAS at a similar rate).
    flops = sum(f for key, (t, f) in h100.items() if key[0] == "masked_linear")
    seconds = sum(t for key, (t, f) in h100.items() if key[0] == "masked_linear")
    rate = flops / seconds
    layer_params = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE
    layer_flops = 2 * layer_params * TOKENS + 4 * TOKENS * TOKENS * HIDDEN
    vision_params = VISION_LAYERS * (
        4 * VISION_HIDDEN**2 + 2 * VISION_HIDDEN * VISION_INTERMEDIATE
    ) + (VISION_HIDDEN * HIDDEN + HIDDEN * HIDDEN)
    vision_flops = 2 * vision_params * VISION_TOKENS
    head_flops = 2 * HIDDEN * VOCAB * TOKENS
    forward = LAYERS * layer_flops + vision_flops + head_flops
    # The backward computes input gradients only (weights frozen): one matmul per forward one.
    scoring = 2 * forward
    score_bytes_rate = (
        h100[("score_accumulate", INTERMEDIATE)][1] / h100[("score_accumulate", INTERMEDIATE)][0]
    )
    score_bytes = (
        (
            LAYERS * (2 * INTERMEDIATE + HIDDEN)
            + VISION_LAYERS * (VISION_INTERMEDIATE + VISION_HIDDEN)
        )
        * TOKENS
        * 2
        * BF16
    )
    per_sample_score = scoring / rate + score_bytes / score_bytes_rate
    samples = 1000
    sweep_points = 64
    per_sample_forward = forward / rate
    neurons_per_layer = 2 * INTERMEDIATE + HIDDEN
    layer_runs = neurons_per_layer * sum(LAYERS - layer for layer in range(LAYERS))
    scan_flops = (
        layer_runs * layer_flops + neurons_per_layer * LAYERS * 2 * HIDDEN * VOCAB * TARGET_TOKENS
    )
    copy_s = h100[("ablate_expand", "out")][0] * (TOKENS / TOKENS)
    per_sample_scan = scan_flops / rate + neurons_per_layer * LAYERS * copy_s

    def human(s: float) -> str:
        if s < 120:
            return f"{s:.1f} s"
        if s < 7200:
            return f"{s / 60:.1f} min"
        if s < 3 * 86400:
            return f"{s / 3600:.1f} h"
        return f"{s / 86400:.1f} days"

    lines = [
        f"Achieved matmul rate used below: {rate / 1e12:.0f} TFLOP/s, the FLOP-weighted rate "
        f"of the four masked_linear cases on H100 ({rate / gpu.tensor_flops:.0%} of peak).",
        "",
        "| run (one H100, bf16, batch 8 x 640 tokens) | FLOPs per sample | predicted per sample "
        "| predicted for 1,000 samples |",
        "|---|---|---|---|",
        f"| CAN scoring (forward + input-gradient backward, score sums of every FFN site) | "
        f"{scoring / 1e12:.1f} TFLOP | {per_sample_score * 1e3:.0f} ms | "
        f"{human(per_sample_score * samples)} |",
        f"| progressive sweep, {sweep_points} points (one masked forward each) | "
        f"{sweep_points * forward / 1e12:.0f} TFLOP | {sweep_points * per_sample_forward:.2f} s | "
        f"{human(sweep_points * per_sample_forward * samples)} |",
        f"| single-neuron scan, {LAYERS} x ({INTERMEDIATE}+{INTERMEDIATE}+{HIDDEN}) = "
        f"{neurons_per_layer * LAYERS:,} neurons, prefix reuse | {scan_flops / 1e18:.2f} EFLOP | "
        f"{human(per_sample_scan)} | {human(per_sample_scan * samples)} |",
    ]
    return "\n".join(lines)


def render(rows: list[report.Row]) -> str:
    tables, h100 = kernel_tables(rows)
    return "\n".join(
        [
            BEGIN,
            "<!-- generated by bench/roofline_triton.py from canfast.kernels.report; "
            "do not edit by hand -->",
            "",
            "## Predicted from the compiled kernels (A100 and H100)",
            "",
            "Each kernel's autotune configs compiled for sm_80 and sm_90 (bf16) by "
            "`python -m canfast.kernels.report` (rows of `bench/results/aot.json`; for "
            f"masked_linear the heaviest epilogues, `{FORWARD}` and `{BACKWARD}`, which bound "
            "the registers of the others); registers and shared memory give the programs "
            "resident per SM. Matmuls: the longest of (a) waves of tiles over the SMs, each SM's "
            f"tensor rate shared by its programs and derated below {SATURATING_WARPS} resident "
            f"warps, (b) the tiles' operand reads from L2 at {L2_BYTES_PER_CLOCK_PER_SM} B per "
            f"clock per SM, (c) x, W and y over HBM at {HBM_EFFICIENCY:.0%} of peak. Streams: "
            "the bytes each SM keeps in flight (one loop iteration's loads per program) against "
            "bandwidth x latency (600 ns), at most "
            f"{HBM_EFFICIENCY:.0%} of peak bandwidth. Peak rates: A100 312 TFLOP/s bf16, "
            "2.04 TB/s, 1.41 GHz; H100 989 TFLOP/s, 3.35 TB/s, 1.83 GHz. Shapes as above: "
            "8 samples x 640 tokens, bf16. The autotuner's pick is modelled as the config with "
            "the best prediction. These are predictions from compiled resources, not "
            "measurements (no GPU ran them), and lower bounds: the model leaves out "
            "instruction issue limits, the epilogue not overlapping the next tile's main loop "
            "(one 8-warp program per SM), atomics and clock throttling, so expect measured "
            "times above these, most for the matmuls.",
            "",
            tables,
            "",
            "### End to end on one H100 (predicted)",
            "",
            end_to_end(h100),
            "",
            "Counted: every linear layer of the language model, vision tower and projector, "
            "attention scores, the LM head at every position (scan: at the target positions, "
            f"{TARGET_TOKENS} per sample), the score sums and the scan's ablated copies. Not "
            "counted: norms, activations, softmax and the greedy decoding of `targets=self`. "
            "The scan runs layers l..31 for a neuron of layer l (the prefix is reused), at "
            "every position, since masking zeroes the channel at every position.",
            END,
        ]
    )


def update(doc: str, generated: str) -> str:
    """``doc`` with the text between the markers replaced (appended if there are none)."""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: generated, doc)
    return doc.rstrip("\n") + "\n\n" + generated + "\n"


def main() -> int:
    rows = load_rows()
    text = update(DOC.read_text(), render(rows))
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, DOC)
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
