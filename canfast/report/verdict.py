"""The report's plain-language verdict, computed from ``sweep.json`` alone.

It answers the two questions a reader opens the report for: did masking the CAN neurons show
the paper's two stages (degradation onset k1, then collapse k*), and how much faster does CAN
collapse the model than random neurons of the same sites?
"""

from __future__ import annotations

import math

from canfast.sweep.result import SweepResult

# k*/k1 below this reads as one abrupt fall rather than two stages.
WELL_SEPARATED = 2.0


def count(value: float | int | None) -> str:
    """A neuron count for prose: thousands separated, halves kept (a median of two seeds)."""
    if value is None:
        return "-"
    value = float(value)
    if math.isinf(value):
        return "inf"
    if value == int(value):
        return f"{int(value):,}"
    return f"{value:,.1f}"


def times(value: float) -> str:
    """A factor for prose: 460x, 3.2x, 1.05x."""
    if value >= 100:
        return f"{value:,.0f}x"
    return f"{value:.3g}x"


def _finite_max(values) -> float | None:
    finite = [v for v in values or [] if v is not None and not math.isnan(v)]
    return max(finite) if finite else None


def verdict(sweep: SweepResult) -> list[str]:
    """Sentences, in reading order, on collapse, its two stages, and the random baseline."""
    tau, onset = sweep.tau, sweep.onset
    ks = sweep.curve.k
    k1, k_star = sweep.k1, sweep.k_star
    sentences = []

    if not ks:
        sentences.append("This was a random-only sweep: no CAN ranking was masked.")
    elif k_star is not None:
        ppl = sweep.curve.ppl_at(k_star)
        ratio = None if ppl is None else ppl / sweep.ppl0
        rise = ""
        if ratio is not None:
            rise = f" raises perplexity {times(ratio)}"
            if math.isinf(ratio):
                rise = " makes perplexity infinite (it overflowed)"
        sentences.append(
            f"CAN collapses the model at k*={count(k_star)}: masking its top {count(k_star)} "
            f"neurons{rise} (collapse means log10 of the PPL ratio >= tau = {tau:g})."
        )
    else:
        peak = _finite_max(sweep.curve.ratio(sweep.ppl0))
        peak_text = (
            f"; the perplexity ratio peaked at {times(peak)} (log10 "
            f"{math.log10(max(peak, 1e-300)):.2f}, below tau = {tau:g})"
            if peak is not None
            else ""
        )
        sentences.append(
            f"No collapse: masking up to k={count(max(ks))} of CAN's top neurons did not "
            f"collapse the model{peak_text}."
        )

    if ks:
        sentences.append(_stages(k1, k_star, onset, max(ks)))
    sentences.append(_baseline(sweep, k_star))
    return sentences


def _stages(k1: int | None, k_star: int | None, onset: float, max_k: int) -> str:
    if k1 is None and k_star is None:
        return (
            f"No two-stage collapse either: the perplexity never reached {onset:g}x its "
            f"unmasked value (the degradation onset), so not even the first stage appeared."
        )
    if k_star is None:
        return (
            f"Only the first stage is visible: degradation sets in at k1={count(k1)} "
            f"(PPL >= {onset:g}x PPL_0), but no collapse follows within k <= {count(max_k)}."
        )
    if k1 is None or k1 >= k_star:
        at = count(k_star)
        return (
            f"No two-stage collapse: degradation onset and collapse come together at k={at}; "
            f"the model falls at once instead of degrading first."
        )
    gap = k_star / k1
    if gap >= WELL_SEPARATED:
        return (
            f"A two-stage collapse is visible: degradation sets in at k1={count(k1)} "
            f"(PPL >= {onset:g}x PPL_0) and collapse follows at k*={count(k_star)}, "
            f"{times(gap)} as many neurons."
        )
    return (
        f"The two stages are barely separated: onset at k1={count(k1)} and collapse at "
        f"k*={count(k_star)}, only {times(gap)} as many neurons, so this reads as nearly one fall."
    )


def _baseline(sweep: SweepResult, k_star: int | None) -> str:
    seeds = sweep.random
    if not seeds:
        return "No random baseline was run, so CAN cannot be compared with chance here."
    median = sweep.random_k_star
    reach = max((s.largest_k or 0 for s in seeds), default=0)
    collapsed = [s.k_star for s in seeds if s.k_star is not None]
    if median is not None:
        if k_star is None:
            return (
                f"Random sets of the same sites collapse the model at a median k* of "
                f"{count(median)}, while CAN's ranking did not collapse it at all."
            )
        factor = median / k_star
        if factor >= 1:
            compare = f"{times(factor)} more"
        else:
            compare = f"{times(1 / factor)} fewer: CAN is no better than chance here"
        return (
            f"Random sets of the same sites need {count(median)} (median of {len(seeds)} "
            f"seeds) against CAN's k*={count(k_star)}: {compare}."
        )
    if collapsed:
        head = (
            f"Only {len(collapsed)} of {len(seeds)} random sets collapsed within "
            f"k <= {count(reach)}, so their median k* lies beyond {count(reach)}"
        )
    else:
        head = f"Random sets did not collapse within k <= {count(reach)} (0 of {len(seeds)} seeds)"
    if k_star is not None and reach:
        return f"{head}; CAN's k*={count(k_star)} is more than {times(reach / k_star)} smaller."
    return f"{head}."
