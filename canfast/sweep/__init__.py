"""Progressive masking sweeps: the collapse curve of a ranking, its stages, and the random
baseline."""

from __future__ import annotations

import time
from collections.abc import Sequence

from canfast.data import Sample
from canfast.errors import BadInput
from canfast.model import Model
from canfast.objective import Objective, evaluate, generate_answers, with_targets
from canfast.score import Scores
from canfast.sites import NeuronSet
from canfast.sweep.baseline import random_ordering
from canfast.sweep.engine import METRICS, Evaluator
from canfast.sweep.result import Curve, SweepResult
from canfast.sweep.schedule import default_schedule
from canfast.sweep.search import trace

KINDS = ("progressive", "random")


def _pool(model: Model, ranking: Scores | NeuronSet) -> dict[str, int]:
    names = ranking.sites if isinstance(ranking, Scores) else list(ranking.by_site())
    return {name: model.site(name).channels for name in names}


def sweep(
    model: Model,
    samples: Sequence[Sample],
    ranking: Scores | NeuronSet,
    kind: str = "progressive",
    schedule: Sequence[int] | None = None,
    tau: float = 1.0,
    onset: float = 1.5,
    seeds: int = 3,
    metric: str = "ppl",
    targets: str = "self",
    batch_size: int = 8,
    masks_per_pass: int = 4,
    max_new_tokens: int = 32,
    generations: int = 4,
    objective: Objective | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> SweepResult:
    """Mask the cumulative top-k of ``ranking`` over ``schedule`` until the model collapses.

    - Collapse at k: ``log10(PPL_k / PPL_0) >= tau``; ``k_star`` is the smallest such k and
      ``k1`` the first k with ``PPL_k / PPL_0 >= onset``.
    - ``seeds`` random orderings of the same sites give the baseline (``kind="random"`` runs
      only the baseline).
    - Greedy generations of the first ``generations`` samples at k = 0, k1 and k_star.
    """
    if kind not in KINDS:
        raise BadInput(f"unknown sweep kind {kind!r}; choose {', '.join(KINDS)}")
    if metric not in METRICS:
        raise BadInput(f"unknown metric {metric!r}; choose {', '.join(METRICS)}")
    if tau <= 0:
        raise BadInput(f"tau must be positive, got {tau}")
    if isinstance(ranking, Scores):
        ranking.check_model(model)
        order = ranking.ranking()
    else:
        order = ranking
    pool = _pool(model, ranking)
    n_neurons = sum(pool.values())
    ks = sorted({k for k in (schedule or default_schedule(n_neurons)) if 0 < k <= n_neurons})
    if not ks:
        raise BadInput(f"the schedule has no k between 1 and {n_neurons}")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    samples = with_targets(model, samples, targets, max_new_tokens, batch_size)
    timings["targets_s"] = time.perf_counter() - clock

    engine = Evaluator(
        model,
        samples,
        metric,
        batch_size,
        masks_per_pass,
        max_new_tokens,
        objective,
        backend,
        progress,
    )
    try:
        clock = time.perf_counter()
        ppl0 = engine([NeuronSet(())])[0]
        timings["base_s"] = time.perf_counter() - clock
        curve = Curve()
        if kind == "progressive":
            clock = time.perf_counter()
            curve = trace(engine, order, [k for k in ks if k <= len(order)], ppl0, tau, onset)
            timings["progressive_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        baseline = []
        for seed in range(seeds):
            shuffled = random_ordering(pool, seed)
            seed_curve = trace(engine, shuffled, ks, ppl0, tau, onset)
            seed_curve.seed = seed
            baseline.append(seed_curve)
        timings["random_s"] = time.perf_counter() - clock
    finally:
        engine.close()

    result = SweepResult(kind, metric, tau, onset, n_neurons, ppl0, curve, baseline, timings)
    result.info = {
        "model": model.name,
        "model_fingerprint": model.fingerprint(),
        "sites": list(pool),
        "n_samples": len(samples),
        "targets": targets,
        "masked_evaluations": engine.calls,
    }
    if generations and kind == "progressive":
        clock = time.perf_counter()
        result.generations = stage_generations(
            model, samples[:generations], order, result, max_new_tokens
        )
        timings["generations_s"] = time.perf_counter() - clock
    return result


def stage_generations(
    model: Model,
    samples: Sequence[Sample],
    order: NeuronSet,
    result: SweepResult,
    max_new_tokens: int = 32,
) -> list[dict]:
    """Greedy answers at k = 0, at the onset k1 and at the collapse k*, one record each."""
    from canfast.mask import masked

    stages = [("base", 0), ("onset", result.k1), ("collapse", result.k_star)]
    records = []
    for stage, k in stages:
        if k is None:
            continue
        if k == 0:
            answers = generate_answers(model, samples, max_new_tokens)
        else:
            with masked(model, order[:k]):
                answers = generate_answers(model, samples, max_new_tokens)
        for i, (sample, answer) in enumerate(zip(samples, answers, strict=True)):
            records.append(
                {
                    "sample": i,
                    "stage": stage,
                    "k": k,
                    "prompt": sample.prompt,
                    "target": sample.target,
                    "answer": answer,
                }
            )
    return records


__all__ = ["KINDS", "METRICS", "SweepResult", "default_schedule", "evaluate", "sweep"]
