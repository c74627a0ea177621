"""Tracing one ordering of neurons: the metric over the k grid, then the exact first k of each
stage, found by searching between the grid points around it."""

from __future__ import annotations

import math
from collections.abc import Callable

from canfast.sites import NeuronSet
from canfast.sweep.evaluator import Evaluator
from canfast.sweep.result import Curve


def collapsed(ppl: float, ppl0: float, tau: float) -> bool:
    return math.log10(max(ppl, 1e-300) / ppl0) >= tau


def degraded(ppl: float, ppl0: float, onset: float) -> bool:
    return ppl / ppl0 >= onset


def trace(
    evaluator: Evaluator,
    ordering: NeuronSet,
    ks: list[int],
    ppl0: float,
    tau: float,
    onset: float,
    refine: bool = True,
) -> Curve:
    """The curve of cumulative top-k masks of ``ordering``, stopped at the first collapse.

    The stage boundaries ``k1`` and ``k_star`` are then narrowed to the exact k, assuming the
    metric does not fall as k grows between two grid points.
    """
    curve = Curve()
    step = evaluator.masks_per_pass
    for start in range(0, len(ks), step):
        group = ks[start : start + step]
        for k, ppl in zip(group, evaluator([ordering[:k] for k in group]), strict=True):
            curve.add(k, ppl)
        if any(collapsed(p, ppl0, tau) for p in curve.ppl):
            break
    curve.k1 = _first(evaluator, ordering, curve, lambda p: degraded(p, ppl0, onset), refine)
    curve.k_star = _first(evaluator, ordering, curve, lambda p: collapsed(p, ppl0, tau), refine)
    return curve


def _first(
    evaluator: Evaluator,
    ordering: NeuronSet,
    curve: Curve,
    reached: Callable[[float], bool],
    refine: bool,
) -> int | None:
    """Smallest k whose metric reaches the stage, searching the gap below the first grid hit."""
    hits = [k for k, p in zip(curve.k, curve.ppl, strict=True) if reached(p)]
    if not hits:
        return None
    hi = hits[0]
    lo = max((k for k in curve.k if k < hi), default=0)
    while refine and hi - lo > 1:
        # Probe up to masks_per_pass evenly spaced points at once: an M-ary search.
        n = min(evaluator.masks_per_pass, hi - lo - 1)
        probes = sorted({lo + max(1, round((hi - lo) * (i + 1) / (n + 1))) for i in range(n)})
        probes = [k for k in probes if lo < k < hi]
        for k, ppl in zip(probes, evaluator([ordering[:k] for k in probes]), strict=True):
            curve.add(k, ppl)
        for k in probes:
            ppl = curve.ppl[curve.k.index(k)]
            if reached(ppl):
                hi = k
                break
            lo = k
    return hi
