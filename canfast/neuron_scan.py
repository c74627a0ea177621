"""Exhaustive single-neuron scans: the exact effect on the loss of removing each neuron alone.

    delta[j] = (sum of target NLL with j removed - sum without) / number of target tokens
             = log(PPL_j / PPL_0)

With a custom objective, delta is the mean loss with the neuron removed minus without. Next to
it every neuron gets the first-order estimate ``-(a * dL/da)`` summed over positions, and its
CAN score. With ``verify_top``, only the neurons ranked highest by the screen, plus a random
calibration sample, are ablated exactly; the others keep NaN as exact delta.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from canfast import __version__
from canfast.ablation import Ablator
from canfast.data import Sample, batches
from canfast.errors import BadInput
from canfast.first_order import estimate_and_can, first_order
from canfast.io import load_tensors, read_json, save_tensors, write_json
from canfast.model import IGNORE, Model
from canfast.objective import Objective, with_targets
from canfast.score import Scores, check_alpha, data_fingerprint
from canfast.sites import NeuronSet
from canfast.work import Work, content_key

SCREENS = ("estimate", "can", "both")
SCAN_FILE = "scan.safetensors"
SUMMARY_FILE = "scan.json"
FIELDS = ("delta", "estimate", "can")
# Neurons per chunk of work: small enough that a killed scan loses little and that ranks share
# evenly, large enough that a chunk's own cost (its file) is nothing beside its ablations.
CHUNK_NEURONS = 256
# Neurons per round of chunks that share one record pass per data batch.
ROUND_NEURONS = 4096


@dataclass
class Scan:
    """Exact deltas, first-order estimates and CAN scores of every neuron of some sites.

    ``scan[site]`` is the float32 tensor of exact deltas (NaN where screening skipped the
    neuron); ``scan.estimate[site]`` the first-order estimate; ``scan.can[site]`` the CAN score.
    ``overview`` is what ``scan.json`` holds.
    """

    delta: dict[str, Tensor]
    estimate: dict[str, Tensor]
    can: dict[str, Tensor]
    meta: dict[str, str] = field(default_factory=dict)
    overview: dict = field(default_factory=dict)
    kind: str = "single"
    info: dict = field(default_factory=dict)

    def __getitem__(self, site: str) -> Tensor:
        return self.delta[site]

    @property
    def sites(self) -> list[str]:
        return list(self.delta)

    def top(self, k: int) -> NeuronSet:
        """The ``k`` neurons with the largest exact delta (the most harmful to remove)."""
        names, values, channels = _flatten(self.delta)
        known = ~torch.isnan(values)
        order = torch.sort(values.masked_fill(~known, -math.inf), descending=True, stable=True)
        picked = [i for i in order.indices.tolist() if known[i]][:k]
        neurons = tuple((names[i], int(channels[i])) for i in picked)
        return NeuronSet(neurons, tuple(float(values[i]) for i in picked))

    # The sweep strategy interface (``canfast sweep --sweep-kind single``).

    def write(self, run_dir: Path) -> list[Path]:
        """Write ``scan.safetensors`` and ``scan.json`` into ``run_dir``."""
        self.save(run_dir)
        return [Path(run_dir) / SCAN_FILE, Path(run_dir) / SUMMARY_FILE]

    def summary_json(self) -> dict:
        """The headline numbers: correlations with the exact delta, overlaps, rate."""
        rho = self.overview.get("spearman", {}).get("all", {})
        return {
            "neurons": self.overview.get("neurons"),
            "exact_ablations": self.overview.get("exact_ablations"),
            "spearman_can": rho.get("can"),
            "spearman_estimate": rho.get("estimate"),
            "can_top_k_overlap": self.overview.get("can_top_k_overlap"),
            "estimated_recall": self.overview.get("screening", {}).get("recall"),
            "top": self.overview.get("top_neurons", [])[:10],
            "ablations_per_s": self.overview.get("timings", {}).get("ablations_per_s"),
        }

    def summary(self, ranking: NeuronSet | None = None, top: int = 10) -> str:
        """The table printed at the end of a scan (``ranking`` is not needed: the scan ranks
        by exact delta)."""
        from canfast.tables import table

        rows = [
            [i + 1, r["neuron"], r["delta"], r["estimate"], r["can"], r["can_rank"]]
            for i, r in enumerate(self.overview.get("top_neurons", [])[:top])
        ]
        head = ["rank", "neuron", "exact delta", "estimate", "CAN", "CAN rank"]
        lines = [table(head, rows), ""]
        rho = self.overview.get("spearman", {})
        for group, values in [("all", rho.get("all", {}))] + list(
            rho.get("by_component", {}).items()
        ):
            lines.append(
                f"Spearman vs exact delta ({group}, {values.get('neurons')} neurons): "
                f"CAN {_fmt(values.get('can'))}, estimate {_fmt(values.get('estimate'))}; "
                f"CAN vs |delta| {_fmt(values.get('can_vs_abs_delta'))}"
            )
        overlap = self.overview.get("can_top_k_overlap", {})
        if overlap:
            shown = ", ".join(f"{v} of the top {k}" for k, v in overlap.items())
            lines.append(f"CAN's top-k holds {shown} by exact delta")
        screening = self.overview.get("screening")
        if screening:
            lines.append(
                f"screening by {screening['screen']}: {self.overview['exact_ablations']} exact of "
                f"{self.overview['neurons']} neurons; estimated recall of the exact top "
                f"{screening['verify_top']}: {_fmt(screening.get('recall'))} "
                f"(95% lower bound {_fmt(screening.get('recall_lower_95'))})"
            )
        timings = self.overview.get("timings", {})
        lines.append(
            f"{self.overview.get('exact_ablations')} exact ablations in "
            f"{timings.get('exact_s', 0):.1f} s ({timings.get('ablations_per_s', 0):.3g}/s)"
        )
        return "\n".join(lines)

    def save(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        tensors = {}
        for site in self.delta:
            for name, values in zip(FIELDS, (self.delta, self.estimate, self.can), strict=True):
                tensors[f"{site}@{name}"] = values[site].float()
        meta = {**self.meta, "sites": json.dumps(self.sites)}
        save_tensors(run_dir / SCAN_FILE, tensors, meta)
        write_json(run_dir / SUMMARY_FILE, self.overview)

    @classmethod
    def load(cls, run_dir: str | Path) -> Scan:
        """Read the scan a run wrote into ``run_dir``."""
        run_dir = Path(run_dir)
        if not (run_dir / SCAN_FILE).is_file():
            raise BadInput(f"{run_dir}: holds no scan ({SCAN_FILE} missing)")
        tensors, meta = load_tensors(run_dir / SCAN_FILE)
        try:
            order = json.loads(meta.pop("sites", "[]"))
        except json.JSONDecodeError:
            order = []
        parts: dict[str, dict[str, Tensor]] = {name: {} for name in FIELDS}
        for key, tensor in tensors.items():
            site, _, name = key.rpartition("@")
            if name not in parts or not site:
                raise BadInput(f"{run_dir / SCAN_FILE}: unexpected tensor {key!r}")
            parts[name][site] = tensor
        sites = order if sorted(order) == sorted(parts["delta"]) else sorted(parts["delta"])
        if not sites or any(sorted(p) != sorted(sites) for p in parts.values()):
            raise BadInput(f"{run_dir / SCAN_FILE}: incomplete scan")
        overview = read_json(run_dir / SUMMARY_FILE) if (run_dir / SUMMARY_FILE).is_file() else {}
        return cls(*({s: parts[n][s] for s in sites} for n in FIELDS), meta, overview)

    def check_model(self, model: Model, source: str = "scan") -> None:
        """Refuse a scan computed on a different model."""
        expected = self.meta.get("model_fingerprint")
        if expected and expected != model.fingerprint():
            raise BadInput(
                f"{source} was computed on another model ({self.meta.get('model', '?')}, "
                f"fingerprint {expected}); this is {model.name} ({model.fingerprint()})"
            )
        unit = "mid" if self.meta.get("unit") == "mid" else "out"
        channels = {s.name: s.channels for s in model.all_sites(unit)}
        for site, values in self.delta.items():
            if channels.get(site) != values.numel():
                raise BadInput(f"{source} site {site} does not exist in {model.name}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _flatten(values: dict[str, Tensor]) -> tuple[list[str], Tensor, Tensor]:
    """Names, the concatenated values and each entry's channel; entry i belongs to
    ``names[owner]``, spelled out per entry."""
    names, flat, channels = [], [], []
    for name, tensor in values.items():
        names += [name] * tensor.numel()
        flat.append(tensor.double().reshape(-1))
        channels.append(torch.arange(tensor.numel()))
    if not flat:
        return [], torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return names, torch.cat(flat), torch.cat(channels)


# ----- statistics -----------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (the Spearman convention)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(x: Tensor, y: Tensor) -> float | None:
    """Spearman's rank correlation over the entries where both are finite; None when fewer
    than three such entries or either side is constant."""
    x = x.double().cpu().numpy()
    y = y.double().cpu().numpy()
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return None
    rx, ry = _ranks(x[keep]), _ranks(y[keep])
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _correlations(scan: Scan, groups: dict[str, list[str]]) -> dict:
    out = {}
    for group, sites in groups.items():
        part = {s: scan.delta[s] for s in sites}
        _, delta, _ = _flatten(part)
        _, estimate, _ = _flatten({s: scan.estimate[s] for s in sites})
        _, can, _ = _flatten({s: scan.can[s] for s in sites})
        out[group] = {
            "neurons": int((~torch.isnan(delta)).sum()),
            "can": spearman(can, delta),
            "estimate": spearman(estimate, delta),
            "can_vs_abs_delta": spearman(can, delta.abs()),
            "abs_estimate_vs_abs_delta": spearman(estimate.abs(), delta.abs()),
        }
    return out


def _summary(scan: Scan, site_info: dict[str, tuple[str, str]], top: int = 20) -> dict:
    """Correlations, top neurons and top-k overlaps for ``scan.json``."""
    names, delta, channels = _flatten(scan.delta)
    _, can, _ = _flatten(scan.can)
    _, estimate, _ = _flatten(scan.estimate)
    by_component: dict[str, list[str]] = {}
    by_kind: dict[str, list[str]] = {}
    for site, (component, kind) in site_info.items():
        by_component.setdefault(component, []).append(site)
        by_kind.setdefault(kind, []).append(site)
    known = ~torch.isnan(delta)
    can_rank = torch.empty_like(can)
    can_rank[torch.sort(can, descending=True, stable=True).indices] = torch.arange(
        1, len(can) + 1, dtype=can.dtype
    )
    exact_order = [
        i
        for i in torch.sort(delta.masked_fill(~known, -math.inf), descending=True).indices.tolist()
        if known[i]
    ]
    can_order = torch.sort(can, descending=True, stable=True).indices.tolist()
    overlap = {}
    for k in (10, 100):
        if len(exact_order) >= k:
            overlap[str(k)] = len(set(exact_order[:k]) & set(can_order[:k]))
    top_records = [
        {
            "neuron": f"{names[i]}:{int(channels[i])}",
            "delta": float(delta[i]),
            "estimate": float(estimate[i]),
            "can": float(can[i]),
            "can_rank": int(can_rank[i]),
        }
        for i in exact_order[:top]
    ]
    return {
        "spearman": {
            "all": _correlations(scan, {"all": list(scan.delta)})["all"],
            "by_component": _correlations(scan, by_component),
            "by_kind": _correlations(scan, by_kind),
        },
        "top_neurons": top_records,
        "can_top_k_overlap": overlap,
    }


def _pieces(items: list[int], size: int) -> list[list[int]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _rounds(indices: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of ``indices`` whose sizes add up to at most ``budget`` (at least one
    index each)."""
    rounds: list[list[int]] = []
    for i in indices:
        if rounds and sum(sizes[j] for j in rounds[-1]) + sizes[i] <= budget:
            rounds[-1].append(i)
        else:
            rounds.append([i])
    return rounds


# ----- screening ------------------------------------------------------------------------------


def _screen_order(estimate: Tensor, can: Tensor, screen: str) -> list[int]:
    """Flat neuron indices, most promising first, by |estimate|, by CAN, or alternating."""
    by_estimate = torch.sort(estimate.abs(), descending=True, stable=True).indices.tolist()
    by_can = torch.sort(can, descending=True, stable=True).indices.tolist()
    if screen == "estimate":
        return by_estimate
    if screen == "can":
        return by_can
    merged, seen = [], set()
    for pair in zip(by_estimate, by_can, strict=True):
        for i in pair:
            if i not in seen:
                seen.add(i)
                merged.append(i)
    return merged


# Share of each calibration neuron's inclusion probability spread uniformly over the pool; the
# rest follows the screen's order. The uniform share bounds every weight at 2x a uniform
# sample's, so a miss far down the screen's order cannot swing the estimate more than that.
CALIBRATION_UNIFORM_SHARE = 0.5


def calibration_probabilities(pool: int, size: int) -> Tensor:
    """Inclusion probability of each neuron the screen left out, in the screen's order (0: the
    first one below its cut), summing to ``size``.

    Half of it is uniform; the other half falls as 1 / (place + 1), capped at 1: the neurons the
    screen only just left out are the likeliest to belong to the exact top N, so they are the
    most often checked. A uniform sample of 64 from thousands catches none of them most of the
    time, and one catch counts for a whole pool's share (an estimate that jumps between 0.55,
    0.71 and 1.0 on ``builtin:tiny-llava``, whose recall is 0.91).
    """
    if size >= pool:
        return torch.ones(pool, dtype=torch.float64)
    harmonic = 1.0 / torch.arange(1, pool + 1, dtype=torch.float64)
    share = CALIBRATION_UNIFORM_SHARE
    weights = share * size / pool + (1 - share) * size * harmonic / harmonic.sum()
    # Capped at 1, the excess goes to the rest in proportion. The weights fall with the place,
    # so the capped ones are the first k: the first place whose weight, scaled to carry the
    # size - k left over its suffix, stays within 1.
    suffix = weights.flip(0).cumsum(0).flip(0)
    left = size - torch.arange(pool, dtype=torch.float64)
    capped = int((left * weights <= suffix).nonzero()[0])
    out = torch.ones(pool, dtype=torch.float64)
    out[capped:] = weights[capped:] * (size - capped) / suffix[capped]
    return out


def draw_calibration(probabilities: Tensor, generator: torch.Generator) -> list[int]:
    """Systematic sampling with unequal probabilities: places ``i`` of the pool, each drawn with
    probability ``probabilities[i]`` exactly, as many as they sum to (one random start, then
    every whole step of their running total)."""
    size = round(float(probabilities.sum()))
    if size == 0:
        return []
    total = torch.cumsum(probabilities, 0)
    total = total * (size / float(total[-1]))
    start = float(torch.rand((), generator=generator, dtype=torch.float64))
    points = start + torch.arange(size, dtype=torch.float64)
    places = torch.searchsorted(total, points, right=True).clamp_max(len(total) - 1)
    return places.tolist()


def estimated_recall(
    delta: Tensor,
    screened: list[int],
    calibration: list[int],
    pool: int,
    probabilities: Sequence[float] | None = None,
    least: float | None = None,
) -> dict:
    """Estimate what share of the exact top-N by |delta| the screened N contain.

    The threshold is the N-th largest |delta| among all neurons measured exactly (screened plus
    calibration). The screened neurons above it are found. Each calibration neuron above it
    stands for ``1 / p`` unscreened ones, ``p`` its probability of being drawn
    (``probabilities``, aligned with ``calibration``; a uniform sample of the ``pool`` when
    None): their sum estimates the missed ones without bias (Horvitz-Thompson). The lower bound
    adds 1.645 standard errors to the missed; with no calibration hit, it takes the rule of three
    at ``least``, the smallest probability in the pool (3 / least missed): the worst place misses
    could hide.
    """
    n = len(screened)
    measured = delta[screened + calibration].abs()
    if n == 0 or len(measured) == 0:
        return {"recall": None, "method": "nothing screened"}
    if probabilities is None:  # a uniform sample
        least = len(calibration) / pool if pool else 0.0
        probabilities = [least] * len(calibration)
    p = torch.tensor(list(probabilities), dtype=torch.float64)
    if least is None:
        least = float(p.min()) if len(p) else 0.0
    threshold = float(torch.sort(measured, descending=True).values[n - 1])
    found = int((delta[screened].abs() >= threshold).sum())
    above = (delta[calibration].abs() >= threshold) if calibration else torch.zeros(0, dtype=bool)
    hits = int(above.sum())
    missed = float((1.0 / p[above]).sum())
    if hits:
        variance = float(((1.0 - p[above]) / p[above].square()).sum())
        missed_high = missed + 1.645 * math.sqrt(variance)
    else:
        missed_high = 3.0 / least if least > 0 else float(pool)
    missed_high = min(float(pool), missed_high)
    recall = found / (found + missed) if found + missed > 0 else None
    low = found / (found + missed_high) if found + missed_high > 0 else None
    return {
        "recall": recall,
        "recall_lower_95": low,
        "threshold_abs_delta": threshold,
        "screened_above_threshold": found,
        "calibration_above_threshold": hits,
        "missed_estimate": missed,
        "calibration_size": len(calibration),
        "unscreened_pool": pool,
        "method": (
            "threshold = N-th largest |delta| among exactly measured neurons; calibration drawn "
            "from the unscreened pool by systematic sampling, with probabilities half uniform, "
            "half falling as 1/place in the screen's order; missed = sum of 1/p over calibration "
            "hits above the threshold (Horvitz-Thompson); recall = found / (found + missed); "
            "lower bound: missed + 1.645 standard errors, or 3/p_min with no hit"
        ),
    }


# ----- the scan -------------------------------------------------------------------------------


def scan(
    model: Model,
    samples: Sequence[Sample],
    sites: Sequence[str] | str | None = None,
    unit: str = "out",
    targets: str = "self",
    verify_top: int | None = None,
    batch_size: int = 8,
    backend: str = "auto",
    objective: Objective | None = None,
    *,
    calibrate: int | None = None,
    screen: str = "estimate",
    alpha: float = 0.5,
    max_batch_tokens: int | None = None,
    max_new_tokens: int = 32,
    seed: int = 0,
    can: Scores | None = None,
    progress: bool = True,
    work: Work | None = None,
) -> Scan:
    """The exact effect of removing each neuron of ``sites`` alone, next to its first-order
    estimate and CAN score.

    - ``verify_top=N``: exact ablation only for the top N neurons by the ``screen``
      (``estimate``: |first-order estimate|; ``can``; ``both``: alternating) plus ``calibrate``
      random others (default 2% of the neurons, at least 64); the rest keep NaN.
    - Blocks of neurons share a forward, sized so that a block holds at most
      ``max_batch_tokens`` tokens (None: :func:`canfast.ablation.block_tokens`, 64K on a GPU,
      fewer on the CPU so a block's activations stay cache-sized); an out-of-memory error
      halves the block.
    - ``can``: CAN scores already computed on these samples and targets (a sweep's ranking);
      scored here when absent.
    - ``work``: where the chunks of exact ablations (up to ``CHUNK_NEURONS`` neurons of one
      site each) are kept and shared across ranks (:class:`canfast.work.Work`).
    """
    alpha = check_alpha(alpha)
    if screen not in SCREENS:
        raise BadInput(f"unknown screen {screen!r}; choose {', '.join(SCREENS)}")
    if not samples:
        raise BadInput("no samples to scan")
    if batch_size < 1:
        raise BadInput(f"batch size must be at least 1, got {batch_size}")
    chosen = model.sites(unit, sites)
    total_neurons = sum(s.channels for s in chosen)
    if verify_top is not None and not 0 < verify_top <= total_neurons:
        raise BadInput(
            f"--verify-top {verify_top} must lie between 1 and the {total_neurons} neurons of "
            "the selected sites"
        )
    if calibrate is not None and calibrate < 0:
        raise BadInput(f"--calibrate must be non-negative, got {calibrate}")
    timings: dict[str, float] = {}
    started = clock = time.perf_counter()
    samples = with_targets(model, samples, targets, max_new_tokens, batch_size)
    timings["targets_s"] = time.perf_counter() - clock
    # Batches of similar lengths carry less padding through every replay; the sums over
    # samples do not depend on their order.
    lengths = [int(model.encode([sample]).labels.shape[1]) for sample in samples]
    by_length = [samples[i] for i in sorted(range(len(samples)), key=lengths.__getitem__)]
    encoded = [model.encode(chunk).to(model.device) for chunk in batches(by_length, batch_size)]
    if objective is None:
        normalizer = float(sum(int((b.labels != IGNORE).sum()) for b in encoded))
        if normalizer == 0:
            raise BadInput("the samples have no target tokens to score")
    else:
        normalizer = float(len(samples))

    clock = time.perf_counter()
    if can is None:
        # One backward per batch gives the estimate and the CAN scores.
        estimate, can = estimate_and_can(
            model, encoded, chosen, normalizer, alpha, objective, backend
        )
        timings["estimate_s"] = time.perf_counter() - clock
    else:
        estimate = first_order(model, encoded, chosen, normalizer, objective)
        timings["estimate_s"] = time.perf_counter() - clock
        can.check_model(model)
    clock = time.perf_counter()
    missing = [s.name for s in chosen if s.name not in can]
    if missing:
        raise BadInput(f"the CAN scores do not cover site {missing[0]}")
    can = {s.name: can[s.name] for s in chosen}
    timings["can_s"] = time.perf_counter() - clock

    # Which neurons get an exact ablation.
    names, flat_estimate, channels = _flatten(estimate)
    _, flat_can, _ = _flatten(can)
    screened: list[int] = []
    calibration: list[int] = []
    drawn_with: list[float] = []
    least: float | None = None
    if verify_top is None:
        exact = list(range(total_neurons))
    else:
        order = _screen_order(flat_estimate, flat_can, screen)
        screened = order[:verify_top]
        rest = order[verify_top:]  # in the screen's order
        wanted = calibrate if calibrate is not None else max(64, math.ceil(0.02 * total_neurons))
        generator = torch.Generator().manual_seed(seed)
        chance = calibration_probabilities(len(rest), min(wanted, len(rest)))
        places = draw_calibration(chance, generator)
        calibration = [rest[i] for i in places]
        drawn_with = [float(chance[i]) for i in places]
        least = float(chance.min()) if len(chance) else None
        exact = sorted(screened + calibration)

    offsets, at = {}, 0
    for site in chosen:
        offsets[site.name] = at
        at += site.channels
    per_site: dict[str, list[int]] = {}
    for i in exact:
        per_site.setdefault(names[i], []).append(int(channels[i]))

    clock = time.perf_counter()
    ablator = Ablator(model, encoded, objective, backend, max_batch_tokens, progress)
    flat_delta = torch.full((total_neurons,), math.nan, dtype=torch.float64)
    chunks = [
        (site, torch.tensor(part))
        for site in chosen
        for part in _pieces(per_site.get(site.name, []), CHUNK_NEURONS)
    ]
    work = work or Work()
    keys = [content_key(f"scan-{site.name}", neurons.tolist()) for site, neurons in chunks]
    sizes = [int(neurons.numel()) for _, neurons in chunks]

    def compute(indices: list[int]):
        job = work.job
        # Counted in neuron-batches and shown in neurons, so the ETA moves within a site.
        bar = tqdm(
            total=sum(sizes[i] for i in indices) * len(encoded),
            desc="scan" + (f" (rank {job.rank} of {job.world})" if job.distributed else ""),
            unit="neuron",
            unit_scale=1 / len(encoded),
            # Whole neurons: the scaled counts are fractions while a site is part done.
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} [{elapsed}<{remaining}, {rate_fmt}]",
            disable=not progress,
            position=job.rank,
        )
        try:
            # A round's sites share one record pass per data batch (Ablator.sites_totals).
            for round_ in _rounds(indices, sizes, ROUND_NEURONS):
                totals = ablator.sites_totals([chunks[i] for i in round_], bar)
                yield from zip(round_, totals, strict=True)
        finally:
            bar.close()

    for (site, wanted), totals in zip(chunks, work.map(keys, sizes, compute), strict=True):
        flat_delta[wanted + offsets[site.name]] = totals / normalizer
    timings["exact_s"] = time.perf_counter() - clock
    timings["total_s"] = time.perf_counter() - started

    def split(flat: Tensor) -> dict[str, Tensor]:
        return {
            s.name: flat[offsets[s.name] : offsets[s.name] + s.channels].float() for s in chosen
        }

    result = Scan(
        split(flat_delta),
        {k: v.float() for k, v in estimate.items()},
        {k: v.float() for k, v in can.items()},
    )
    result.meta = {
        "unit": unit,
        "targets": targets,
        "alpha": repr(alpha),
        "model": model.name,
        "model_fingerprint": model.fingerprint(),
        "data_fingerprint": data_fingerprint(samples),
        "n_samples": str(len(samples)),
        "target_tokens": str(int(normalizer)) if objective is None else "",
        "objective": "mean_nll" if objective is None else getattr(objective, "__name__", "custom"),
        "verify_top": "" if verify_top is None else str(verify_top),
        "screen": screen if verify_top is not None else "",
        "canfast_version": __version__,
    }
    summary = _summary(result, {s.name: (s.component, s.kind) for s in chosen})
    summary["neurons"] = total_neurons
    summary["exact_ablations"] = len(exact)
    if verify_top is not None:
        summary["screening"] = {
            "screen": screen,
            "verify_top": verify_top,
            "calibration": len(calibration),
            "seed": seed,
            **estimated_recall(
                flat_delta, screened, calibration, total_neurons - verify_top, drawn_with, least
            ),
        }
    exact_s = max(timings["exact_s"], 1e-9)
    summary["timings"] = {
        **timings,
        "ablations_per_s": len(exact) / exact_s,
        "block_halvings": ablator.halvings,
    }
    summary["meta"] = {k: v for k, v in result.meta.items()}
    result.overview = summary
    return result
