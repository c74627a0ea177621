"""Tracing orderings of neurons: the metric at growing k, then the exact first k of each stage.

Each ordering's trace is a plan of steps (a generator that asks for the metric at some k and
receives it), so that :func:`trace_all` can run the plans of several orderings side by side and
hand all their pending evaluations to the evaluator at once: that is what lets the ranks of a
torchrun job share a sweep. Two plans exist:

- :func:`grid_plan`, the default: every k of the grid up to the first collapse (the curve the
  report draws), then a search between grid points for the exact stage boundaries;
- :func:`search_plan` (``--search``): k = 1, 2, 4, ... until collapse, then bisection, which finds
  the same k1 and k* with far fewer evaluations when the curve rises with k.

Both assume that the metric does not fall as k grows; :func:`falls` lists where it does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence

from canfast.sites import NeuronSet
from canfast.sweep.evaluator import Evaluator
from canfast.sweep.result import Curve

# A plan yields the k values it needs next (one forward pass), receives their metrics, and
# returns the finished curve.
Plan = Generator[list[int], list[float], Curve]


def collapsed(ppl: float, ppl0: float, tau: float) -> bool:
    return math.log10(max(ppl, 1e-300) / ppl0) >= tau


def degraded(ppl: float, ppl0: float, onset: float) -> bool:
    return ppl / ppl0 >= onset


def grid_plan(
    ks: list[int], ppl0: float, tau: float, onset: float, per_pass: int, refine: bool = True
) -> Plan:
    """The metric at the grid ``ks`` up to the first collapse, then the exact stages."""
    curve = Curve()
    for start in range(0, len(ks), per_pass):
        group = ks[start : start + per_pass]
        for k, ppl in zip(group, (yield group), strict=True):
            curve.add(k, ppl)
        if any(collapsed(p, ppl0, tau) for p in curve.ppl):
            break
    curve.k1 = yield from _first(curve, lambda p: degraded(p, ppl0, onset), per_pass, refine)
    curve.k_star = yield from _first(curve, lambda p: collapsed(p, ppl0, tau), per_pass, refine)
    return curve


def search_plan(n: int, ppl0: float, tau: float, onset: float, per_pass: int) -> Plan:
    """k1 and k* of an ordering of ``n`` neurons with as few evaluations as the assumption of a
    rising curve allows: the grid plan over the gallop k = 1, 2, 4, ..., n, whose search between
    its last miss and first hit is then a bisection."""
    gallop = sorted({min(1 << i, n) for i in range(max(n, 1).bit_length() + 1)})
    return grid_plan(gallop, ppl0, tau, onset, per_pass)


def _first(
    curve: Curve, reached: Callable[[float], bool], per_pass: int, refine: bool
) -> Generator[list[int], list[float], int | None]:
    """Smallest k whose metric reaches the stage, searching the gap below the first hit."""
    hits = [k for k, p in zip(curve.k, curve.ppl, strict=True) if reached(p)]
    if not hits:
        return None
    hi = hits[0]
    lo = max((k for k in curve.k if k < hi), default=0)
    while refine and hi - lo > 1:
        # Probe up to per_pass evenly spaced points at once: an M-ary search.
        n = min(per_pass, hi - lo - 1)
        probes = sorted({lo + max(1, round((hi - lo) * (i + 1) / (n + 1))) for i in range(n)})
        probes = [k for k in probes if lo < k < hi]
        for k, ppl in zip(probes, (yield probes), strict=True):
            curve.add(k, ppl)
        for k in probes:
            if reached(curve.ppl[curve.k.index(k)]):
                hi = k
                break
            lo = k
    return hi


def trace_all(
    evaluator: Evaluator, orderings: Sequence[NeuronSet], plans: list[Plan]
) -> list[Curve]:
    """Run the plan of each ordering side by side; each round evaluates the next step of every
    unfinished plan in one call (one forward pass per step)."""
    curves: list[Curve | None] = [None] * len(plans)
    pending: dict[int, list[int]] = {}

    def advance(i: int, values: list[float] | None) -> None:
        try:
            pending[i] = plans[i].send(values) if values is not None else next(plans[i])
        except StopIteration as stop:
            pending.pop(i, None)
            curves[i] = stop.value

    for i in range(len(plans)):
        advance(i, None)
    while pending:
        order = list(pending)
        groups = [[orderings[i][:k] for k in pending[i]] for i in order]
        for i, values in zip(order, evaluator.groups(groups), strict=True):
            advance(i, values)
    return [c for c in curves if c is not None]


def trace(
    evaluator: Evaluator,
    ordering: NeuronSet,
    ks: list[int],
    ppl0: float,
    tau: float,
    onset: float,
    refine: bool = True,
) -> Curve:
    """The curve of cumulative top-k masks of one ordering (:func:`grid_plan`)."""
    plan = grid_plan(ks, ppl0, tau, onset, evaluator.masks_per_pass, refine)
    return trace_all(evaluator, [ordering], [plan])[0]


def falls(curve: Curve) -> list[dict]:
    """Every place where the metric falls as k grows, between neighbouring evaluated points:
    where the assumption behind the stage search does not hold."""
    points = sorted(zip(curve.k, curve.ppl, strict=True))
    return [
        {"k_before": a, "ppl_before": pa, "k": b, "ppl": pb}
        for (a, pa), (b, pb) in zip(points, points[1:])
        if pb < pa
    ]
