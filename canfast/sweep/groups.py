"""Separate sweeps per part of the model or per data category: where the critical neurons
live, and how few of them each part needs to collapse the model."""

from __future__ import annotations

from collections.abc import Sequence

from canfast.data import Sample
from canfast.errors import BadInput
from canfast.model import Model
from canfast.score import Scores, score

GROUPINGS = ("component", "kind", "category")


def _restrict(scores: Scores, sites: list[str]) -> Scores:
    return Scores(
        {s: scores.values[s] for s in sites},
        {s: scores.stats[s] for s in sites if s in scores.stats},
        dict(scores.meta),
    )


def sweep_by(
    by: str,
    model: Model,
    samples: Sequence[Sample],
    scores: Scores,
    **sweep_options,
) -> list[dict]:
    """One row per group: its neuron count, onset k1, collapse k*, and the random median k*.

    Component and kind groups mask only that group's sites, ranked by the same scores (a
    neuron's score does not depend on which other sites are scored). Category groups are scored
    and swept on that category's samples alone. ``samples`` must already carry their targets.
    """
    from canfast.sweep import sweep

    if by not in GROUPINGS:
        raise BadInput(f"unknown --by {by!r}; choose {', '.join(GROUPINGS)}")
    sweep_options = {**sweep_options, "generations": 0, "targets": "given"}
    rows = []
    if by == "category":
        categories = sorted({s.category for s in samples if s.category is not None})
        if not categories:
            raise BadInput("--by category, but no sample has a category")
        unit = scores.meta.get("unit", "out")
        alpha = float(scores.meta.get("alpha", 0.5))
        for category in categories:
            subset = [s for s in samples if s.category == category]
            group_scores = score(
                model,
                subset,
                alpha=alpha,
                unit=unit,
                sites=scores.sites,
                targets="given",
                batch_size=sweep_options.get("batch_size", 8),
                backend=sweep_options.get("backend", "auto"),
                progress=sweep_options.get("progress", True),
            )
            result = sweep(model, subset, group_scores, **sweep_options)
            rows.append(_row(category, result, len(subset)))
        return rows
    groups: dict[str, list[str]] = {}
    for site_name in scores.sites:
        component, _, kind = site_name.split(".")
        groups.setdefault(component if by == "component" else kind, []).append(site_name)
    for group, sites in groups.items():
        result = sweep(model, samples, _restrict(scores, sites), **sweep_options)
        rows.append(_row(group, result, len(samples)))
    return rows


def _row(group: str, result, n_samples: int) -> dict:
    return {
        "group": group,
        "n_neurons": result.n_neurons,
        "n_samples": n_samples,
        "ppl0": result.ppl0,
        "k1": result.k1,
        "k_star": result.k_star,
        "random_k_star": result.random_k_star,
    }
