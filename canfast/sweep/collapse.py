"""The collapse sweep that the progressive and random strategies share: the unmasked metric,
the ranking's curve (progressive only), and the random baseline."""

from __future__ import annotations

import math

from canfast.errors import warn
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
    tau = config.log10_tau()
    fully_masked = None
    try:
        with timings.measure("base"):
            ppl0 = evaluator([NeuronSet(())])[0]
        curve = Curve()
        if ranked:
            order = job.order
            with timings.measure("progressive"):
                ks = [k for k in job.ks if k <= len(order)]
                curve = trace(evaluator, order, ks, ppl0, tau, config.onset)
        with timings.measure("random"):
            baseline = random_curves(evaluator, pool, job.ks, ppl0, tau, config.onset, config.seeds)
        collapsed = curve.k_star is not None or any(c.k_star is not None for c in baseline)
        if not collapsed:
            with timings.measure("fully_masked"):
                everything = NeuronSet(tuple((s, j) for s, n in pool.items() for j in range(n)))
                fully_masked = evaluator([everything])[0]
    finally:
        evaluator.close()
    result = SweepResult(
        config.kind,
        config.metric,
        tau,
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
    result.criterion = config.criterion
    if fully_masked is not None:
        result.info["fully_masked"] = _unreachable(fully_masked, ppl0, tau, n_neurons, config)
    return result


def _unreachable(ppl: float, ppl0: float, tau: float, n_neurons: int, config) -> dict:
    """Measured once when nothing collapsed: the loss with every selected neuron masked, and a
    warning when even that does not meet the criterion (a bounded loss, a tau too high)."""
    rise = math.log(max(ppl, 1e-300) / ppl0)
    needed = tau * math.log(10)
    record = {"ppl": ppl, "mean_loss_rise": rise, "needed_rise": needed}
    record["reachable"] = rise >= needed
    if rise < needed:
        hint = "a smaller --tau"
        if config.criterion == "ratio":
            hint += ", or --criterion delta for a loss that is not an NLL"
        warn(
            f"collapse cannot be reached: with all {n_neurons} selected neurons masked the mean "
            f"loss rises by {rise:.4g}, and the criterion needs {needed:.4g}; try {hint}"
        )
    return record
