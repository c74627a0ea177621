"""Separate sweeps per part of the model or per data category: where the critical neurons
live, and how few of them each part needs to collapse the model."""

from __future__ import annotations

from dataclasses import replace

from canfast.errors import BadInput
from canfast.score import Scores, score
from canfast.sweep.strategy import SweepJob, run_strategy, site_channels
from canfast.timing import Timings

GROUPINGS = ("component", "kind", "category")


def _group_job(job: SweepJob, ranking: Scores, samples=None) -> SweepJob:
    """``job`` narrowed to one group: its sites (and samples), its own k grid, no generations."""
    config = replace(job.config, generations=0, by=())
    ks = config.ks(sum(site_channels(job.model, ranking).values()))
    samples = job.samples if samples is None else samples
    return replace(job, samples=samples, ranking=ranking, config=config, ks=ks, timings=Timings())


def sweep_by(by: str, job: SweepJob) -> list[dict]:
    """One row per group: its neuron count, onset k1, collapse k*, and the random median k*.

    Component and kind groups mask only that group's sites, ranked by the same scores (a
    neuron's score does not depend on which other sites are scored). Category groups are scored
    and swept on that category's samples alone.
    """
    if by not in GROUPINGS:
        raise BadInput(f"unknown --by {by!r}; choose {', '.join(GROUPINGS)}")
    scores = job.ranking
    if not isinstance(scores, Scores):
        raise BadInput("--by needs scores, not a bare neuron set")
    rows = []
    if by == "category":
        categories = sorted({s.category for s in job.samples if s.category is not None})
        if not categories:
            raise BadInput("--by category, but no sample has a category")
        for category in categories:
            subset = [s for s in job.samples if s.category == category]
            group_scores = score(
                job.model,
                subset,
                alpha=float(scores.meta.get("alpha", 0.5)),
                unit=scores.meta.get("unit", "out"),
                sites=scores.sites,
                targets="given",
                batch_size=job.batch_size,
                objective=job.objective,
                backend=job.backend,
                progress=job.progress,
            )
            result = run_strategy(_group_job(job, group_scores, subset))
            rows.append(_row(category, result, len(subset)))
        return rows
    groups: dict[str, list[str]] = {}
    for site_name in scores.sites:
        component, _, kind = site_name.split(".")
        groups.setdefault(component if by == "component" else kind, []).append(site_name)
    for group, sites in groups.items():
        result = run_strategy(_group_job(job, scores.only(sites)))
        rows.append(_row(group, result, len(job.samples)))
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
