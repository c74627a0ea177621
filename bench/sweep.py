"""Sweeps: canfast's curve against the naive loop, --search against a step-1 linear scan, two
gloo ranks against one process, and the cost of keeping chunks for --resume.

1. Curve over 64 k values. The LLaVA-shaped random model of ``bench/scan.py`` in its skinny
   shape (CLIP tower, projector, 128-wide Llama LM, 32k vocabulary, 32M parameters) and its 8
   samples; the masks are the top-k language neurons of a CAN score, k = 16, 32, ..., 1024.
   - naive: what the public scripts do: forward hooks zero the masked channels, one full
     forward per k (vision tower included), logits over the whole vocabulary at every position.
   - canfast: ``Evaluator`` as a sweep runs it (8 masks per pass, prefix reuse, target-only
     logits), and with each of the three switched off in turn, to attribute the gain.
2. ``--search`` against the step-1 linear scan of the same weak ranking (the language neurons
   of ``builtin:tiny-llava`` by activation magnitude alone, CAN with alpha = 0, whose k* is in
   the hundreds): masked evaluations and time to k1 and k*, and where the curve fell.
3. Two gloo ranks against one process, on the scan of ``builtin:tiny-llava``'s language sites
   (``canfast sweep --sweep-kind single``, one thread per process): wall time and identical files.
4. Resume overhead: the sweep of part 1 with chunks kept in a journal against none.

Ratios are taken within one run, as medians of interleaved rounds; the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import canfast
import canfast.objective as objective_module
from canfast.model import IGNORE
from canfast.objective import with_targets
from canfast.sites import NeuronSet
from canfast.sweep.evaluator import Evaluator
from canfast.sweep.trace import falls, grid_plan, search_plan, trace_all
from canfast.work import Work

sys.path.insert(0, str(Path(__file__).parent))
from scan import build_llava, llava_samples  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sweep.json"


def median_times(runs: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each named callable over interleaved rounds."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# ----- 1. the curve ------------------------------------------------------------------------------


@torch.no_grad()
def naive_curve(model, samples, sets: list[NeuronSet]) -> list[float]:
    """Hooks zero the masked output channels; one full forward per set, full logits."""
    batch = model.encode(samples)
    ppls = []
    for neurons in sets:
        handles = []
        for site_name, channels in neurons.by_site().items():
            module = model.site(site_name).module
            index = torch.tensor(channels)

            def zero(module, args, output, index=index):
                output = output.clone()
                output[..., index] = 0
                return output

            handles.append(module.register_forward_hook(zero))
        try:
            logits = model.forward(batch).logits.float()
        finally:
            for handle in handles:
                handle.remove()
        # Labels are aligned with the logits that predict them (canfast's encoding).
        scored = batch.labels != IGNORE
        nll = torch.nn.functional.cross_entropy(
            logits[scored], batch.labels[scored], reduction="sum"
        )
        ppls.append(float(torch.exp(nll / scored.sum())))
    return ppls


@contextmanager
def full_logits():
    """The sweep evaluation with target-only logits switched off (for attribution only)."""
    original = objective_module.target_only

    def everywhere(model, labels, enabled=True):
        return original(model, labels, enabled=False)

    objective_module.target_only = everywhere
    try:
        yield
    finally:
        objective_module.target_only = original


def curve_bench(quick: bool, rounds: int) -> dict:
    model = build_llava(quick, "skinny")
    vocab = model.hf.config.text_config.vocab_size
    samples = llava_samples(8, vocab)
    language = [s.name for s in model.sites("out") if s.component == "language"]
    scores = canfast.score(model, samples, sites=language, targets="given", progress=False)
    order = scores.ranking()
    ks = [16 * i for i in range(1, 65)]
    sets = [order[:k] for k in ks]
    common = {"batch_size": 8, "progress": False, "sites": language}

    def canfast_run(masks_per_pass=8, reuse=True, logits="target"):
        evaluator = Evaluator(model, samples, masks_per_pass=masks_per_pass, reuse=reuse, **common)
        if logits == "full":
            with full_logits():
                return evaluator(sets)
        return evaluator(sets)

    reference = naive_curve(model, samples, sets)
    fast = canfast_run()
    worst = max(abs(a - b) / b for a, b in zip(fast, reference, strict=True))
    runs = {
        "naive": lambda: naive_curve(model, samples, sets),
        "canfast": canfast_run,
        "canfast, no prefix reuse": lambda: canfast_run(reuse=False),
        "canfast, one mask per pass": lambda: canfast_run(masks_per_pass=1),
        "canfast, full logits": lambda: canfast_run(logits="full"),
    }
    times = median_times(runs, rounds)
    base = times["canfast"]
    return {
        "k_values": len(ks),
        "samples": len(samples),
        "vocab": vocab,
        "seconds": times,
        "speedup_vs_naive": times["naive"] / base,
        "gain_of": {
            "prefix_reuse": times["canfast, no prefix reuse"] / base,
            "batched_masks": times["canfast, one mask per pass"] / base,
            "target_only_logits": times["canfast, full logits"] / base,
        },
        "max_relative_ppl_difference_vs_naive": worst,
    }


# ----- 2. search ---------------------------------------------------------------------------------


def search_bench(samples_n: int) -> dict:
    model = canfast.load("builtin:tiny-llava")
    samples = with_targets(
        model, canfast.load_data("builtin:shapes", limit=samples_n), "self", 16, 8
    )
    pool = {s.name: s.channels for s in model.sites("out") if s.component == "language"}
    # A weak ranking: activation magnitude alone (CAN with alpha = 0).
    weak = canfast.score(
        model, samples, alpha=0.0, sites=list(pool), targets="given", progress=False
    )
    ordering = weak.ranking()
    n = len(ordering)
    tau, onset, per_pass = 1.0, 1.5, 4
    out = {}
    for name in ("linear", "search"):
        evaluator = Evaluator(
            model, samples, masks_per_pass=per_pass, sites=list(pool), progress=False
        )
        ppl0 = evaluator([NeuronSet(())])[0]
        if name == "linear":
            plan = grid_plan(list(range(1, n + 1)), ppl0, tau, onset, per_pass)
        else:
            plan = search_plan(n, ppl0, tau, onset, per_pass)
        start = time.perf_counter()
        curve = trace_all(evaluator, [ordering], [plan])[0]
        seconds = time.perf_counter() - start
        out[name] = {"evaluations": len(curve.k), "seconds": seconds}
        out[name] |= {"k1": curve.k1, "k_star": curve.k_star, "falls": len(falls(curve))}
    out["fewer_evaluations"] = out["linear"]["evaluations"] / out["search"]["evaluations"]
    out["less_time"] = out["linear"]["seconds"] / out["search"]["seconds"]
    out["same_stages"] = (out["linear"]["k1"], out["linear"]["k_star"]) == (
        out["search"]["k1"],
        out["search"]["k_star"],
    )
    return out


# ----- 3. ranks ----------------------------------------------------------------------------------


def ranks_bench(samples_n: int) -> dict:
    args = ["sweep", "--sweep-kind", "single", "--sites", "language.*", "--limit", str(samples_n)]
    args += ["--max-new-tokens", "8", "--batch-size", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "one process": [sys.executable, "-m", "canfast.cli"],
            "two gloo ranks": [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                "-m",
                "canfast.cli",
            ],
        }
        for name, launcher in runs.items():
            target = Path(tmp) / name.replace(" ", "-")
            start = time.perf_counter()
            subprocess.run(
                [*launcher, *args, "--out", str(target)], env=env, check=True, capture_output=True
            )
            out[name] = time.perf_counter() - start
        one, two = (Path(tmp) / n.replace(" ", "-") for n in runs)
        same = (one / "scan.safetensors").read_bytes() == (two / "scan.safetensors").read_bytes()
        a, b = (json.loads((d / "scan.json").read_text()) for d in (one, two))
        a.pop("timings"), b.pop("timings")
    return {
        "seconds": out,
        "speedup": out["one process"] / out["two gloo ranks"],
        "identical_files": same and a == b,
    }


# ----- 4. resume overhead ------------------------------------------------------------------------


def resume_bench(quick: bool, rounds: int) -> dict:
    model = build_llava(quick, "skinny")
    samples = llava_samples(8, model.hf.config.text_config.vocab_size)
    language = [s.name for s in model.sites("out") if s.component == "language"]
    scores = canfast.score(model, samples, sites=language, targets="given", progress=False)
    sets = [scores.ranking()[:k] for k in range(16, 1025, 16)]

    def run(journal: bool):
        with tempfile.TemporaryDirectory() as tmp:
            work = Work(Path(tmp) / "chunks" if journal else None)
            Evaluator(model, samples, progress=False, sites=language, work=work)(sets)

    times = median_times({"no journal": lambda: run(False), "journal": lambda: run(True)}, rounds)
    return {"seconds": times, "overhead": times["journal"] / times["no journal"] - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--search-samples", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
    }
    rounds = 1 if args.quick else args.rounds
    report["curve"] = curve_bench(args.quick, rounds)
    report["search"] = search_bench(args.search_samples)
    report["ranks"] = ranks_bench(4 if args.quick else 8)
    report["resume"] = resume_bench(args.quick, rounds)
    report["load_average_end"] = list(os.getloadavg())
    c, s, r, o = report["curve"], report["search"], report["ranks"], report["resume"]
    rows = [
        ("curve, 64 k: canfast vs naive loop", f"{c['speedup_vs_naive']:.2f}x faster"),
        ("  gain of prefix reuse", f"{c['gain_of']['prefix_reuse']:.2f}x"),
        ("  gain of batched masks (8 per pass)", f"{c['gain_of']['batched_masks']:.2f}x"),
        ("  gain of target-only logits", f"{c['gain_of']['target_only_logits']:.2f}x"),
        ("  max relative PPL difference", f"{c['max_relative_ppl_difference_vs_naive']:.1e}"),
        (
            "--search vs step-1: evaluations",
            f"{s['linear']['evaluations']} / {s['search']['evaluations']} = "
            f"{s['fewer_evaluations']:.1f}x fewer",
        ),
        ("--search vs step-1: time", f"{s['less_time']:.1f}x less"),
        (
            "--search: k1, k* (step-1 / search)",
            f"{s['linear']['k1']}, {s['linear']['k_star']} / {s['search']['k1']}, "
            f"{s['search']['k_star']}; falls seen by search: {s['search']['falls']}",
        ),
        (
            "scan, 2 gloo ranks vs 1 process",
            f"{r['speedup']:.2f}x, identical: {r['identical_files']}",
        ),
        ("resume journal overhead", f"{o['overhead']:+.1%}"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
