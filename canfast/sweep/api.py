"""``canfast.sweep``: run one registered strategy on a model, samples and a ranking."""

from __future__ import annotations

from collections.abc import Sequence

from canfast.data import Sample
from canfast.model import Model
from canfast.objective import Objective, with_targets
from canfast.score import Scores
from canfast.sites import NeuronSet
from canfast.sweep.strategy import (
    StrategyResult,
    SweepConfig,
    SweepJob,
    run_strategy,
    site_channels,
)
from canfast.timing import Timings


def sweep(
    model: Model,
    samples: Sequence[Sample],
    ranking: Scores | NeuronSet,
    kind: str = "progressive",
    schedule: Sequence[int] | str | None = None,
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
) -> StrategyResult:
    """Sweep ``ranking`` with the strategy ``kind`` (see :class:`SweepConfig` for the options).

    The ``progressive`` strategy masks the cumulative top-k of ``ranking`` over ``schedule``
    until the model collapses and returns a :class:`~canfast.sweep.result.SweepResult`:

    - collapse at k: ``log10(PPL_k / PPL_0) >= tau``; ``k_star`` is the smallest such k and
      ``k1`` the first k with ``PPL_k / PPL_0 >= onset``;
    - ``seeds`` random orderings of the same sites give the baseline (``kind="random"`` runs
      only the baseline);
    - greedy generations of the first ``generations`` samples at k = 0, k1 and k_star.
    """
    config = SweepConfig(kind, schedule, tau, onset, seeds, metric, masks_per_pass, generations)
    config.check()
    if isinstance(ranking, Scores):
        ranking.check_model(model)
    ks = config.ks(sum(site_channels(model, ranking).values()))
    timings = Timings()
    with timings.measure("targets"):
        samples = with_targets(model, samples, targets, max_new_tokens, batch_size)
    job = SweepJob(
        model,
        samples,
        ranking,
        config,
        ks,
        targets=targets,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        objective=objective,
        backend=backend,
        progress=progress,
        timings=timings,
    )
    return run_strategy(job)
