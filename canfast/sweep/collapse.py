"""The collapse sweep that the progressive and random strategies share: the unmasked metric,
the ranking's curve (progressive only), and the random baseline."""

from __future__ import annotations

from canfast.sites import NeuronSet
from canfast.sweep.baseline import random_curves
from canfast.sweep.result import Curve, SweepResult
from canfast.sweep.strategy import SweepJob
from canfast.sweep.trace import trace


def collapse_sweep(job: SweepJob, ranked: bool) -> SweepResult:
    """Trace the ranking's cumulative top-k (when ``ranked``) and ``seeds`` random orderings."""
    config, timings = job.config, job.timings
    pool = job.pool
    n_neurons = sum(pool.values())
    evaluator = job.evaluator()
    try:
        with timings.measure("base"):
            ppl0 = evaluator([NeuronSet(())])[0]
        curve = Curve()
        if ranked:
            order = job.order
            with timings.measure("progressive"):
                ks = [k for k in job.ks if k <= len(order)]
                curve = trace(evaluator, order, ks, ppl0, config.tau, config.onset)
        with timings.measure("random"):
            baseline = random_curves(
                evaluator, pool, job.ks, ppl0, config.tau, config.onset, config.seeds
            )
    finally:
        evaluator.close()
    result = SweepResult(
        config.kind,
        config.metric,
        config.tau,
        config.onset,
        n_neurons,
        ppl0,
        curve,
        baseline,
        timings,
    )
    result.info = {
        "model": job.model.name,
        "model_fingerprint": job.model.fingerprint(),
        "sites": list(pool),
        "n_samples": len(job.samples),
        "targets": job.targets,
        "score_eos": job.model.score_eos,
        "masked_evaluations": evaluator.calls,
    }
    return result
