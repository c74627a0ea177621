"""The ``random`` strategy: only the baseline, random neuron sets from the ranking's sites."""

from __future__ import annotations

from canfast.sweep.collapse import collapse_sweep
from canfast.sweep.result import SweepResult
from canfast.sweep.strategy import SweepJob, register


@register(
    "random", "only the baseline: random neuron sets of the same sites", groups=True, report=True
)
def random_baseline(job: SweepJob) -> SweepResult:
    return collapse_sweep(job, ranked=False)
