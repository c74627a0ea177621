"""The ``progressive`` strategy: mask the ranking's cumulative top-k for growing k until the
model collapses, beside random sets of the same sizes, and show the stages in words."""

from __future__ import annotations

from collections.abc import Sequence

from canfast.data import Sample
from canfast.mask import masked
from canfast.model import Model
from canfast.objective import generate_answers
from canfast.sites import NeuronSet
from canfast.sweep.collapse import collapse_sweep
from canfast.sweep.result import SweepResult
from canfast.sweep.strategy import SweepJob, register


@register(
    "progressive",
    "mask the top-k of the ranking for growing k, beside random sets",
    groups=True,
    report=True,
)
def progressive(job: SweepJob) -> SweepResult:
    result = collapse_sweep(job, ranked=True)
    if job.config.generations:
        with job.timings.measure("generations"):
            result.generations = stage_generations(
                job.model,
                job.samples[: job.config.generations],
                job.order,
                result,
                job.max_new_tokens,
            )
    return result


def stage_generations(
    model: Model,
    samples: Sequence[Sample],
    order: NeuronSet,
    result: SweepResult,
    max_new_tokens: int = 32,
) -> list[dict]:
    """Greedy answers at k = 0, at the onset k1 and at the collapse k*, one record each."""
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
