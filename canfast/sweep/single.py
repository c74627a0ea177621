"""The ``single`` strategy: the exhaustive single-neuron scan of the ranking's sites.

Every neuron's exact effect on the loss when removed alone, next to its first-order estimate
and the CAN score the pipeline just computed (:mod:`canfast.neuron_scan`). Writes
``scan.safetensors`` and ``scan.json`` instead of ``sweep.json``.
"""

from __future__ import annotations

from canfast.errors import BadInput
from canfast.neuron_scan import Scan, scan
from canfast.score import Scores
from canfast.sweep.strategy import SweepJob, register


@register(
    "single",
    "exact effect of removing each neuron alone, beside its estimate and CAN score",
    report=True,
)
def single(job: SweepJob) -> Scan:
    if not isinstance(job.ranking, Scores):
        raise BadInput("--sweep-kind single needs CAN scores of the sites it scans")
    config = job.config
    unit = job.ranking.meta.get("unit", "out")
    result = scan(
        job.model,
        job.samples,
        sites=job.ranking.sites,
        unit=unit,
        targets="given",
        verify_top=config.verify_top,
        batch_size=job.batch_size,
        backend=job.backend,
        objective=job.objective,
        calibrate=config.calibrate,
        screen=config.screen,
        alpha=float(job.ranking.meta.get("alpha", 0.5)),
        max_batch_tokens=config.max_batch_tokens,
        max_new_tokens=job.max_new_tokens,
        can=job.ranking,
        progress=job.progress,
        work=job.work,
    )
    # The samples came with their targets; say where those came from.
    result.meta["targets"] = job.targets
    result.overview["meta"]["targets"] = job.targets
    result.info = {"model": job.model.name, "sites": job.ranking.sites}
    return result
