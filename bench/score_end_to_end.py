"""End-to-end cost of CAN scoring against the bare work it cannot avoid.

The floor is a forward and a backward pass that produce the activation gradients at every FFN
site (parameters frozen, exactly what scoring needs) with nothing done to them. Against it:

- fused: ``canfast.score`` on the cpp backend, its default path: each site's Linear runs
  through ``masked_linear`` with a score sink, which (no masks being in force) runs as torch's
  own product and adds the CAN sums with the cpp kernel from a hook on that product's backward
  node;
- hooks + kernel: the same backend with ``path="hooks"``: hooks keep activations and gradients
  and the cpp ``score_accumulate`` kernel reduces them;
- reference: the torch backend (hooks and the pure-PyTorch reduction).

The paths are timed in interleaved rounds, one run of each per round in a shuffled order, so
that a noisy neighbour slows all of them alike. A path's ratio is the median over rounds of its
time over the floor's time in the same round (paired, so slow drift of the machine cancels);
median seconds are printed beside it, with a 95% bootstrap interval of that median: on a shared
2-core machine single rounds range over tens of percent, and the interval says how far the
median could move on a rerun. Beside it, "best" is the path's fastest run over the floor's
fastest: a neighbour only ever adds time, so the fastest runs are the closest to each path's own
cost, and the two estimates disagreeing says the run was too noisy to read.

The process uses the allocator settings of the ``canfast`` command (``canfast.allocator``) for
every path alike: with glibc's defaults, how many pages each pass faults in depends on the order
of its frees more than on its work, and that noise is as large as the differences timed here.

Model: a ~50M-parameter Llama-shaped causal LM with random weights (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import canfast
from canfast import ops
from canfast.allocator import keep_freed_memory
from canfast.data import Sample

RESULTS = Path(__file__).parent / "results"


def build(quick: bool) -> canfast.Model:
    vocab = [f"w{i}" for i in range(2000)] + ["<pad>", "<s>", "</s>", "<unk>"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    size = (
        dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2)
        if quick
        else dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=8)
    )
    config = LlamaConfig(
        vocab_size=8000,
        num_attention_heads=8 if not quick else 4,
        num_key_value_heads=8 if not quick else 4,
        pad_token_id=vocab.index("<pad>"),
        bos_token_id=vocab.index("<s>"),
        eos_token_id=vocab.index("</s>"),
        **size,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    return canfast.Model(hf, tok, name="bench-llama")


def samples(n: int, prompt_words: int, target_words: int) -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        words = [
            f"w{int(i)}"
            for i in torch.randint(0, 2000, (prompt_words + target_words,), generator=g)
        ]
        out.append(Sample(None, " ".join(words[:prompt_words]), " ".join(words[prompt_words:])))
    return out


def bare(model: canfast.Model, data: list[Sample], batch_size: int) -> None:
    """Activation gradients at every site and nothing else: the floor of any scoring method."""
    from canfast.objective import mean_nll

    sites = model.sites()

    def start_graph(module, args, output):
        return output if output.requires_grad else output.detach().requires_grad_()

    handles = [s.module.register_forward_hook(start_graph) for s in sites]
    model.hf.requires_grad_(False)
    try:
        for start in range(0, len(data), batch_size):
            batch = model.encode(data[start : start + batch_size])
            mean_nll(model.forward(batch), batch).sum().backward()
    finally:
        for h in handles:
            h.remove()


def interleaved(paths: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each path in each of ``repeats`` rounds, one run of each per round, in an
    order shuffled per round (seeded), so no path always follows the same one."""
    for fn in paths.values():
        fn()  # warm-up: allocator, thread pool, first-call paths
    times: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            paths[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median_interval(values: list[float], resamples: int = 2000) -> list[float]:
    """A 95% bootstrap interval of the median: how far the quoted ratio could move on a rerun
    of this noisy machine."""
    draw = random.Random(0).choices
    medians = sorted(statistics.median(draw(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke run")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="samples per run, all in one batch (default: canfast's own batch size)",
    )
    args = parser.parse_args()
    allocator = keep_freed_memory()
    model = build(args.quick)
    n_params = sum(p.numel() for p in model.hf.parameters())
    # One batch of 128-token samples per run, at the batch size canfast scores with by default:
    # a run's fixed costs (routes, totals, fingerprint) are all in it, once.
    batch_size = args.batch_size if not args.quick else 2
    data = samples(batch_size, 96, 32) if not args.quick else samples(2, 16, 8)
    with torch.no_grad():
        model.encode(data[:1])

    def scoring(backend: str, path: str):
        return lambda: canfast.score(
            model,
            data,
            targets="given",
            batch_size=batch_size,
            backend=backend,
            progress=False,
            path=path,
        )

    paths = {"forward+backward (activation grads only)": lambda: bare(model, data, batch_size)}
    if ops.available("cpp"):
        paths["fused (cpp, canfast.score default)"] = scoring("cpp", "fused")
        paths["hooks + kernel (cpp, path=hooks)"] = scoring("cpp", "hooks")
    paths["reference (torch backend, hooks)"] = scoring("torch", "hooks")
    times = interleaved(paths, args.repeats)
    floor = times["forward+backward (activation grads only)"]
    rows = []
    for name, seconds in times.items():
        ratios = [t / f for t, f in zip(seconds, floor, strict=True)]
        rows.append(
            {
                "path": name,
                "seconds": statistics.median(seconds),
                "ratio": statistics.median(ratios),
                "ratio_ci95": median_interval(ratios),
                "ratio_range": [min(ratios), max(ratios)],
                "best_ratio": min(seconds) / min(floor),
            }
        )
    load = os.getloadavg()[0]  # the machine is shared: say how busy it was
    tokens = sum(model.encode([s]).inputs["input_ids"].shape[1] for s in data)
    print(
        f"model: Llama-shaped, {n_params / 1e6:.1f}M parameters, {len(data)} samples, "
        f"{tokens} tokens in one batch, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"load average {load:.1f} at the end"
    )
    print(
        f"{args.repeats} interleaved rounds; allocator settings of the canfast command: "
        f"{'applied' if allocator else 'not available here'}"
    )
    print(
        f"{'path':48s} {'median s':>9s} {'x floor':>8s} {'95% interval':>14s} {'range':>14s} "
        f"{'best':>6s}"
    )
    for r in rows:
        low, high = r["ratio_range"]
        ci_low, ci_high = r["ratio_ci95"]
        print(
            f"{r['path']:48s} {r['seconds']:9.3f} {r['ratio']:8.3f} "
            f"{ci_low:7.3f}-{ci_high:.3f} {low:7.3f}-{high:.3f} {r['best_ratio']:6.3f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        "params": n_params,
        "samples": len(data),
        "batch_size": batch_size,
        "tokens": tokens,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ratio": "median over rounds of the path's time over the floor's time in that round",
        "best_ratio": "the path's fastest run over the floor's fastest run",
        "allocator_settings": allocator,
        "load_average_at_end": load,
        "quick": args.quick,
    }
    name = f"score_end_to_end_{'quick' if args.quick else f'batch{batch_size}'}.json"
    (RESULTS / name).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
