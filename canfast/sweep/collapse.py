"""The collapse sweep that the progressive and random strategies share: the unmasked metric,
the ranking's curve (progressive only), and the random baseline."""

from __future__ import annotations

import math

from canfast.errors import warn
from canfast.sites import NeuronSet
from canfast.sweep.baseline import random_ordering
from canfast.sweep.result import Curve, SweepResult
from canfast.sweep.strategy import SweepJob
from canfast.sweep.trace import Plan, falls, grid_plan, search_plan, trace_all


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
        # The ranking and every random seed are traced side by side: each round hands the
        # next step of each to the evaluator at once, which the ranks of a job share.
        orderings, plans = [], []
        if ranked:
            order = job.order
            orderings.append(order)
            plans.append(_plan(job, [k for k in job.ks if k <= len(order)], len(order), ppl0))
        for seed in range(config.seeds):
            orderings.append(random_ordering(pool, seed))
            plans.append(_plan(job, job.ks, n_neurons, ppl0))
        with timings.measure("curves"):
            curves = trace_all(evaluator, orderings, plans)
        curve = curves.pop(0) if ranked else Curve()
        baseline = curves
        for seed, random_curve in enumerate(baseline):
            random_curve.seed = seed
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
    if config.search:
        result.info["search"] = _search_record(curve if ranked else None, baseline)
    if fully_masked is not None:
        result.info["fully_masked"] = _unreachable(fully_masked, ppl0, tau, n_neurons, config)
    return result


def _plan(job: SweepJob, ks: list[int], n: int, ppl0: float) -> Plan:
    config = job.config
    tau, per_pass = config.log10_tau(), job.config.masks_per_pass
    if config.search:
        return search_plan(n, ppl0, tau, config.onset, per_pass)
    return grid_plan(ks, ppl0, tau, config.onset, per_pass)


def _search_record(ranked: Curve | None, baseline: list[Curve]) -> dict:
    """What ``--search`` evaluated, and every point where the curve fell as k grew: there the
    assumption behind the search fails, and k1 or k* may not be the first k that reaches it."""
    named = ([("ranking", ranked)] if ranked is not None else []) + [
        (f"seed {c.seed}", c) for c in baseline
    ]
    orderings = {name: {"evaluated": len(c.k), "falls": falls(c)} for name, c in named}
    record = {
        "method": "k = 1, 2, 4, ... until collapse, then bisection of each stage",
        "evaluations": sum(len(c.k) for _, c in named),
        "monotone": not any(o["falls"] for o in orderings.values()),
        "orderings": orderings,
    }
    if not record["monotone"]:
        bad = next(name for name, o in orderings.items() if o["falls"])
        warn(
            f"--search: the metric of the {bad} ordering falls as k grows (see sweep.json "
            "search.orderings); k1 and k* are first k's found under that assumption"
        )
    return record


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
