"""Exhaustive single-neuron scans: canfast against the naive loop and against its floor, and
screening against the full exact scan.

1. Full exact scan. A LLaVA-shaped model with random weights (CLIP tower, projector, Llama LM
   with a 32k vocabulary; ``--shape llava``, 49M parameters, LLaVA-1.5-7b's proportions, or
   ``--shape skinny``, 32M, a 128-wide LM); 8 samples of 64 image tokens, 16 prompt tokens
   and 16 target tokens. Every ``down`` and ``mid`` neuron of one early and one late language
   layer. Results go to ``results/scan.json`` (``scan_skinny.json`` for the skinny shape).
   - naive: what a user writes: a hook zeroes one neuron, one full forward per neuron. It is
     timed on a sample of neurons per site (the whole loop would take hours here) and its
     per-neuron time is multiplied out; the deltas of those neurons are compared with canfast's.
   - floor: the matmul FLOPs canfast cannot avoid (everything after the site, logits at target
     positions only), counted by ``FlopCounterMode`` on one replayed block per site, over the
     matmul rate measured in the same run on the scan's own GEMM shapes: the FFN products and
     the attention projections of the tiled batch, and the vocabulary projection, each at the
     faster of one product and the tiles canfast runs it in (``target_logits``), so the floor
     does not charge canfast for a slow way of doing a product. The record passes (one
     forward per batch) are left out of the floor, which makes it stricter; attention counts
     its full square, where a causal kernel could skip half (about 1% of the floor's FLOPs
     here), which makes it laxer by that much.
2. Screening on ``builtin:tiny-llava``, all sites: the full exact scan against a screened scan
   that ablates at most 5% of the neurons exactly (top N plus the calibration sample), and how
   many of the exact top-100 by |delta| each screen (|estimate|, CAN, both) finds.

Ratios are taken within one run; the machine may be shared, so read them, not the seconds. On
a shared machine run it with ``OMP_NUM_THREADS=1``: with two threads, a thread that another
process preempts leaves its partner spinning at every barrier, and wall and CPU time alike
swell by a factor that changes from minute to minute (at a load of 9 on 2 cores the full scan's
CPU time was about 7x what one thread needs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import canfast
from canfast import prefix, target_logits
from canfast.ablation import Ablator
from canfast.allocator import keep_freed_memory
from canfast.data import Sample
from canfast.model import IGNORE
from canfast.neuron_scan import _flatten, _screen_order, scan

RESULTS = Path(__file__).parent / "results" / "scan.json"
IMAGE_TOKEN = "<image>"


# Vision tower and language model of the bench model, as (vision, language) config fields.
SHAPES = {
    # Shaped like LLaVA-1.5-7b, scaled down: the language model is wider than the vision tower
    # (512 and 256 here; 4096 and 1024 there), its FFN 2.7x its width as there, and it holds most
    # of the parameters (with the 32k vocabulary's embedding and head).
    "llava": (
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4),
        dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4),
    ),
    # A 128-wide language model behind a 512-wide vision tower: the naive loop is cheap (the
    # tower is most of its cost), and the language model's elementwise work (norms, rotary,
    # SiLU) weighs as much as its products, which a real model's width does not let it.
    "skinny": (
        dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=7),
        dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4),
    ),
}


def build_llava(quick: bool, shape: str = "llava") -> canfast.Model:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab_size = 2000 if quick else 32000
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials) - 1)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_size, patch = 128, 16  # 8 x 8 = 64 image tokens
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        ),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    vision, language = SHAPES[shape]
    if quick:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        language = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            num_attention_heads=8,
            image_size=image_size,
            patch_size=patch,
            projection_dim=language["hidden_size"],
            **vision,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
            **language,
        ),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch) ** 2,
    )
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(config).eval()
    return canfast.Model(hf, processor, name="bench-llava", prompt_template="{prompt}")


def llava_samples(n: int, vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        pixels = torch.randint(0, 256, (128, 128, 3), generator=g, dtype=torch.uint8).numpy()
        # <s> and <image> join the 15 prompt words: 16 prompt tokens; 15 target words + EOS.
        words = torch.randint(4, vocab - 1, (30,), generator=g).tolist()
        prompt = f"{IMAGE_TOKEN} " + " ".join(f"w{w - 4}" for w in words[:15])
        target = " ".join(f"w{w - 4}" for w in words[15:])
        out.append(Sample(Image.fromarray(pixels), prompt, target))
    return out


def _naive_delta(model, batch, site, channel, base) -> float:
    def out_hook(module, args, output):
        output = output.clone()
        output[..., channel] = 0
        return output

    def in_hook(module, args):
        x = args[0].clone()
        x[..., channel] = 0
        return (x, *args[1:])

    handle = (
        site.module.register_forward_hook(out_hook)
        if site.unit == "out"
        else site.module.register_forward_pre_hook(in_hook)
    )
    try:
        return _corpus_nll(model, batch) - base
    finally:
        handle.remove()


@torch.no_grad()
def _corpus_nll(model, batch) -> float:
    logits = model.forward(batch).logits.float()
    scored = batch.labels != IGNORE
    return float(
        torch.nn.functional.cross_entropy(logits[scored], batch.labels[scored], reduction="sum")
    )


def _best_seconds(run, repeats: int) -> tuple[float, float]:
    """The best wall and the best CPU time (this process) of ``repeats`` calls of ``run``."""
    wall = cpu = math.inf
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def _matmul_rate(
    shapes: dict[tuple[int, int, int], float], repeats: int = 3
) -> tuple[float, float]:
    """FLOP/s of torch.mm over the (M, K, N) shapes together, each timed once (best of
    ``repeats``) and weighted by how often the scan runs it, per wall second and per CPU
    second. Each shape also runs in the tiles of the fused vocabulary projection (rows x
    vocabulary entries), and the faster way counts."""
    flops = sum(2 * m * k * n * times for (m, k, n), times in shapes.items())
    wall = cpu = 0.0
    rows, cols = target_logits.ROW_TILE, target_logits.VOCAB_TILE
    for (m, k, n), times in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        tiles = [
            (a[i : i + rows], b[:, j : j + cols])
            for i in range(0, m, rows)
            for j in range(0, n, cols)
        ]

        def whole(a=a, b=b):
            torch.mm(a, b)

        def tiled(tiles=tiles):
            for x, y in tiles:
                torch.mm(x, y)

        one, split = _best_seconds(whole, repeats), _best_seconds(tiled, repeats)
        wall += times * min(one[0], split[0])
        cpu += times * min(one[1], split[1])
    return flops / wall, flops / cpu


def full_scan_bench(quick: bool, naive_per_site: int, shape: str = "llava") -> dict:
    model = build_llava(quick, shape)
    params = sum(p.numel() for p in model.hf.parameters())
    vocab = model.hf.config.text_config.vocab_size
    samples = llava_samples(8, vocab - 1)
    layers = model.hf.config.text_config.num_hidden_layers
    early, late = 1, layers - 1
    names = [f"language.{layer}.{kind}" for layer in (early, late) for kind in ("down", "mid")]
    batch = model.encode(samples)
    tokens = int(batch.labels.shape[1])
    print(f"model {params / 1e6:.1f}M parameters, sequence {tokens} tokens, sites {names}")

    # canfast: the full exact scan of the four sites, one run per unit (targets given).
    clock, clock_cpu = time.perf_counter(), time.process_time()
    results = {}
    for unit in ("out", "mid"):
        chosen = [n for n in names if (n.endswith(".mid")) == (unit == "mid")]
        results[unit] = scan(
            model, samples, sites=chosen, unit=unit, targets="given", progress=False
        )
    canfast_s = time.perf_counter() - clock
    # CPU time of the whole scans (estimate, CAN and record passes included, so it can only
    # overstate the exact part): less moved than wall time by other processes' load.
    canfast_cpu_s = time.process_time() - clock_cpu
    exact_s = sum(r.overview["timings"]["exact_s"] for r in results.values())
    neurons = sum(r.overview["neurons"] for r in results.values())

    # The floor: FLOPs of one replayed block per site, times the blocks, over the matmul rate.
    ablator = Ablator(model, [batch], progress=False)
    floor_flops = 0.0
    shapes: dict[tuple[int, int, int], float] = {}
    for name in names:
        site = model.site(name)
        recorded = ablator.timeline()
        cut = recorded.cut(site.module)
        with torch.no_grad(), prefix.recording(cut, recorded.call(site.module)) as record:
            ablator._forward_losses(batch)
        size = ablator.block_size(batch)
        block = torch.arange(min(size, site.channels))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            ablator.ablate_block(batch, site, cut, record, block)
        floor_flops += counter.get_total_flops() / len(block) * site.channels
        rows = len(block) * batch.labels.numel()
        hidden = model.hf.config.text_config.hidden_size
        inter = model.hf.config.text_config.intermediate_size
        targets = len(block) * int((batch.labels != IGNORE).sum())
        # Per layer after the site: gate, up, down; q, k, v, o (Llama's MHA here); then the
        # vocabulary projection. Weighted by the blocks the site takes.
        blocks = site.channels / len(block)
        after = model.hf.config.text_config.num_hidden_layers - 1 - int(name.split(".")[1])
        for shape, count in (
            ((rows, hidden, inter), 2 * after),
            ((rows, inter, hidden), after),
            ((rows, hidden, hidden), 4 * after),
            ((targets, hidden, vocab), 1),
        ):
            if count:
                shapes[shape] = shapes.get(shape, 0.0) + count * blocks
    rate, rate_cpu = _matmul_rate(shapes)
    floor_s = floor_flops / rate
    floor_cpu_s = floor_flops / rate_cpu

    # naive: a sample of neurons per site, one full forward each, the deltas compared.
    base = _corpus_nll(model, batch)
    count = int((batch.labels != IGNORE).sum())
    naive_times, worst = [], 0.0
    g = torch.Generator().manual_seed(2)
    for name in names:
        site = model.site(name)
        unit_result = results["mid" if name.endswith(".mid") else "out"]
        for channel in torch.randperm(site.channels, generator=g)[:naive_per_site].tolist():
            start = time.perf_counter()
            delta = _naive_delta(model, batch, site, channel, base) / count
            naive_times.append(time.perf_counter() - start)
            got = float(unit_result[name][channel])
            worst = max(worst, abs(got - delta) / max(abs(delta), 1e-6))
    naive_per_neuron = statistics.median(naive_times)
    naive_s = naive_per_neuron * neurons
    return {
        "model_parameters": params,
        "sequence_tokens": tokens,
        "sites": names,
        "neurons": neurons,
        "canfast_exact_s": exact_s,
        "canfast_total_s": canfast_s,
        "canfast_ablations_per_s": neurons / exact_s,
        "naive_neurons_timed": len(naive_times),
        "naive_s_per_neuron_median": naive_per_neuron,
        "naive_s_extrapolated": naive_s,
        "naive_ablations_per_s": 1.0 / naive_per_neuron,
        "speedup_vs_naive": naive_s / exact_s,
        "floor_flops": floor_flops,
        "matmul_rate_flops": rate,
        "floor_s": floor_s,
        "ratio_to_floor": exact_s / floor_s,
        "canfast_total_cpu_s": canfast_cpu_s,
        "matmul_rate_flops_per_cpu_s": rate_cpu,
        "floor_cpu_s": floor_cpu_s,
        "ratio_to_floor_cpu_time": canfast_cpu_s / floor_cpu_s,
        "max_relative_difference_vs_naive_fp32": worst,
    }


def screening_bench(samples_n: int) -> dict:
    model = canfast.load("builtin:tiny-llava")
    from canfast.zoo import builtin_samples

    samples = builtin_samples("shapes")[:samples_n]
    samples = canfast.objective.with_targets(model, samples, "self")
    # Wall and CPU time (this process's threads only, so less moved by other processes on a
    # shared machine) of each run.
    wall, cpu = time.perf_counter(), time.process_time()
    full = scan(model, samples, targets="given", progress=False)
    full_wall, full_cpu = time.perf_counter() - wall, time.process_time() - cpu
    total = full.overview["neurons"]
    _, delta, _ = _flatten(full.delta)
    _, estimate, _ = _flatten(full.estimate)
    _, can, _ = _flatten(full.can)
    top100 = set(torch.sort(delta.abs(), descending=True).indices[:100].tolist())
    # The smallest calibration sample the scan allows leaves the most of the 5% budget to the
    # screen (the default would be 2% of the neurons).
    calibrate = 64
    budget = math.floor(0.05 * total)
    verify_top = budget - calibrate
    found = {}
    for screen in ("estimate", "can", "both"):
        chosen = set(_screen_order(estimate, can, screen)[:verify_top])
        found[screen] = len(chosen & top100)
    best = max(found, key=lambda s: found[s])
    # The screened run is short: its median of three is less at the mercy of one moment's load.
    walls, cpus = [], []
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        screened = scan(
            model,
            samples,
            targets="given",
            verify_top=verify_top,
            calibrate=calibrate,
            screen=best,
            progress=False,
        )
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    screened_s, screened_cpu = statistics.median(walls), statistics.median(cpus)
    _, measured, _ = _flatten(screened.delta)
    known = set((~torch.isnan(measured)).nonzero().flatten().tolist())
    full_s = full_wall
    return {
        "samples": samples_n,
        "neurons": total,
        "exact_in_screened_run": screened.overview["exact_ablations"],
        "exact_share": screened.overview["exact_ablations"] / total,
        "verify_top": verify_top,
        "calibration": calibrate,
        "top100_found_by_screen_alone": found,
        "screen_used": best,
        "top100_found_in_screened_run": len(known & top100),
        "estimated_recall": screened.overview["screening"].get("recall"),
        "estimated_recall_lower_95": screened.overview["screening"].get("recall_lower_95"),
        "full_scan_s": full_s,
        "screened_scan_s": screened_s,
        "screened_scan_s_runs": walls,
        "time_ratio": full_s / screened_s,
        "full_scan_cpu_s": full_cpu,
        "screened_scan_cpu_s": screened_cpu,
        "cpu_time_ratio": full_cpu / screened_cpu,
        "screened_timings": screened.overview["timings"],
        "full_ablations_per_s": full.overview["timings"]["ablations_per_s"],
        "screened_ablations_per_s": screened.overview["timings"]["ablations_per_s"],
        "spearman_all": full.overview["spearman"]["all"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llava", help="bench model")
    parser.add_argument("--naive-per-site", type=int, default=4)
    parser.add_argument("--screen-samples", type=int, default=4)
    parser.add_argument(
        "--screening-only", action="store_true", help="rerun part 2, keep part 1's results"
    )
    args = parser.parse_args()
    # As `canfast sweep --sweep-kind single` runs: with the command's allocator settings.
    allocator = keep_freed_memory()
    torch.manual_seed(0)
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "allocator_settings": allocator,
        "shape": args.shape,
        # The machine may be shared: the 1, 5 and 15 minute load averages around the run.
        "load_average_start": list(os.getloadavg()),
    }
    if args.screening_only:
        saved = RESULTS if args.shape == "llava" else RESULTS.with_name(f"scan_{args.shape}.json")
        report["full"] = json.loads(saved.read_text())["full"]
    else:
        report["full"] = full_scan_bench(
            args.quick, 2 if args.quick else args.naive_per_site, args.shape
        )
    report["screening"] = screening_bench(2 if args.quick else args.screen_samples)
    report["load_average_end"] = list(os.getloadavg())
    full, screening = report["full"], report["screening"]
    rows = [
        ("neurons scanned (down + mid, two layers)", f"{full['neurons']}"),
        ("canfast exact scan vs naive loop", f"{full['speedup_vs_naive']:.2f}x faster"),
        ("canfast exact scan / its floor", f"{full['ratio_to_floor']:.2f}x"),
        ("canfast whole scan / its floor, CPU time", f"{full['ratio_to_floor_cpu_time']:.2f}x"),
        (
            "ablations/s canfast : naive",
            f"{full['canfast_ablations_per_s'] / full['naive_ablations_per_s']:.1f} : 1",
        ),
        (
            "max relative difference vs naive (fp32)",
            f"{full['max_relative_difference_vs_naive_fp32']:.2e}",
        ),
        ("screening: exact share of neurons", f"{screening['exact_share']:.1%}"),
        (
            "screening: exact top-100 found",
            f"{screening['top100_found_in_screened_run']}/100 ({screening['screen_used']})",
        ),
        ("screening: full exact / screened time", f"{screening['time_ratio']:.1f}x"),
        ("screening: full exact / screened CPU time", f"{screening['cpu_time_ratio']:.1f}x"),
        ("screening: estimated recall", f"{screening['estimated_recall']}"),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print(json.dumps(screening["top100_found_by_screen_alone"]))
    if not args.quick:
        out = RESULTS if args.shape == "llava" else RESULTS.with_name(f"scan_{args.shape}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
