"""The whole run, from small config objects: targets, scores (computed or read), the sweep by
its strategy, ``--by`` groups, the run directory's files and the report.

The command line builds these objects from its options and calls :func:`run`; Python users call
it the same way::

    from canfast.pipeline import DataConfig, ModelConfig, SweepConfig, run

    done = run(ModelConfig("builtin:tiny-llava"), DataConfig(limit=8), sweep=SweepConfig())
    print(done.result.summary(done.scores.ranking()))

Every check on the inputs runs before the model loads, and nothing is written to the run
directory until the work is done.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from canfast.data import Sample, load_data
from canfast.errors import BadInput
from canfast.model import Model, load, quiet_transformers
from canfast.objective import Objective, with_targets
from canfast.score import Scores, check_alpha, score
from canfast.sites import NeuronSet, Site
from canfast.sweep import StrategyResult, SweepConfig, SweepJob, sweep_by
from canfast.timing import Timings

DEFAULT_MODEL = "builtin:tiny-llava"
DEFAULT_DATA = "builtin:shapes"
SCORES_FILE = "scores.safetensors"
NEURONS_FILE = "neurons.json"


@dataclass
class ModelConfig:
    """Which model to load and where: a Hub id, a local directory or ``builtin:NAME``.

    ``quiet`` keeps transformers' advisory warnings and progress bars off a terminal that is
    not one (the command line sets it).
    """

    name: str = DEFAULT_MODEL
    dtype: str | None = None
    device: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False
    quiet: bool = False

    def load(self) -> Model:
        if self.quiet:
            quiet_transformers()
            if not sys.stderr.isatty():
                # A pipe or a log gets plain lines: a bad-input error stays the only line.
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
        return load(
            self.name,
            dtype=self.dtype,
            device=self.device,
            device_map=self.device_map,
            trust_remote_code=self.trust_remote_code,
        )


@dataclass
class DataConfig:
    """The samples and the targets every loss is scored on.

    ``source``: ``builtin:NAME``, a JSONL file, an image folder (with ``prompt``), or samples
    already in memory.
    ``targets``: ``self`` (the unmasked model's greedy answers, ``max_new_tokens`` long) or
    ``given`` (the data's own). ``score_eos``: append EOS to every target and score it.
    ``batch_size`` applies to every pass over the samples.
    """

    source: str | Sequence[Sample] = DEFAULT_DATA
    prompt: str | None = None
    limit: int | None = None
    targets: str = "self"
    max_new_tokens: int = 32
    batch_size: int = 8
    score_eos: bool = True

    def load(self) -> list[Sample]:
        if isinstance(self.source, str):
            return load_data(self.source, prompt=self.prompt, limit=self.limit)
        samples = list(self.source)[: self.limit]
        if not samples:
            raise BadInput("no samples")
        return samples


@dataclass
class SiteConfig:
    """The sites to score and mask: by unit, glob patterns, components and kinds."""

    unit: str = "out"
    patterns: Sequence[str] = ()
    components: Sequence[str] = ()
    kinds: Sequence[str] = ()

    def select(self, model: Model) -> list[Site]:
        return model.sites(self.unit, list(self.patterns), self.components, self.kinds)


@dataclass
class ScoreConfig:
    """How neurons are scored: the CAN exponent, the loss (``objective``, default mean NLL)
    and the kernel backend (also used for masking). ``path``: read these scores
    (``scores.safetensors`` or its run directory) instead of scoring."""

    alpha: float = 0.5
    backend: str = "auto"
    objective: Objective | None = None
    path: Path | None = None
    progress: bool = True


@dataclass
class RunOutcome:
    """What :func:`run` did: the run directory, the scores, the strategy's result (None for a
    scoring run) and every file written."""

    out: Path
    scores: Scores
    result: StrategyResult | None = None
    files: list[Path] = field(default_factory=list)


def run(
    model: ModelConfig | Model,
    data: DataConfig | None = None,
    sites: SiteConfig | None = None,
    scoring: ScoreConfig | None = None,
    sweep: SweepConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    report: bool = True,
) -> RunOutcome:
    """Score (or read the scores), sweep when ``sweep`` is given, and write the run directory.

    Writes ``scores.safetensors`` and ``neurons.json`` (unless the scores were read), the
    strategy's own files, and ``report.html`` when the strategy has one. ``out`` defaults to
    ``runs/<score|sweep>-MODEL-TIME``; an existing non-empty one needs ``overwrite``.
    """
    data, sites = data or DataConfig(), sites or SiteConfig()
    scoring = scoring or ScoreConfig()
    check_alpha(scoring.alpha)
    strategy = sweep.check() if sweep is not None else None
    name = model.name if isinstance(model, Model | ModelConfig) else str(model)
    out = Path(out) if out is not None else default_out("sweep" if sweep else "score", name)
    check_out(out, overwrite)
    samples = data.load()
    loaded = model.load() if isinstance(model, ModelConfig) else model
    # A Model passed in keeps its own setting once the run is over.
    kept, loaded.score_eos = loaded.score_eos, data.score_eos
    try:
        scores, result = _compute(loaded, samples, data, sites, scoring, sweep, strategy)
    finally:
        loaded.score_eos = kept
    shown = strategy if report else None
    return _write_run(out, overwrite, scores, scoring.path is None, result, shown)


def _compute(loaded, samples, data, sites, scoring, sweep, strategy):
    """The scores (read or computed) and the strategy's result (None without a sweep)."""
    chosen = [s.name for s in sites.select(loaded)]
    scores = read_scores(scoring.path, loaded) if scoring.path is not None else None
    result = None
    if sweep is None:
        if scores is None:
            scores = _score(loaded, samples, sites, scoring, data, chosen, data.targets)
    else:
        ks = sweep.ks(sum(loaded.site(s).channels for s in chosen))
        timings = Timings()
        with timings.measure("targets"):
            samples = with_targets(
                loaded, samples, data.targets, data.max_new_tokens, data.batch_size
            )
        if scores is None:
            scores = _score(loaded, samples, sites, scoring, data, chosen, "given")
            scores.meta["targets"] = data.targets
        job = SweepJob(
            loaded,
            samples,
            scores,
            sweep,
            ks,
            targets=data.targets,
            batch_size=data.batch_size,
            max_new_tokens=data.max_new_tokens,
            objective=scoring.objective,
            backend=scoring.backend,
            progress=scoring.progress,
            timings=timings,
        )
        result = strategy.run(job)
        if sweep.by:
            result.info["by"] = {grouping: sweep_by(grouping, job) for grouping in sweep.by}
    return scores, result


def _score(model, samples, sites, scoring, data, chosen, targets) -> Scores:
    scores = score(
        model,
        samples,
        alpha=scoring.alpha,
        unit=sites.unit,
        sites=chosen,
        targets=targets,
        batch_size=data.batch_size,
        max_new_tokens=data.max_new_tokens,
        objective=scoring.objective,
        backend=scoring.backend,
        progress=scoring.progress,
    )
    scores.meta["score_eos"] = str(model.score_eos).lower()
    return scores


def _write_run(out, overwrite, scores, write_scores, result, strategy) -> RunOutcome:
    from canfast.io import prepare_run_dir, write_json

    out = prepare_run_dir(out, overwrite)
    done = RunOutcome(out, scores, result)
    if write_scores:
        scores.save(out / SCORES_FILE)
        done.files.append(out / SCORES_FILE)
        done.files.append(write_json(out / NEURONS_FILE, scores.ranking().to_records()))
    if result is not None:
        done.files += result.write(out)
    if strategy and strategy.report:
        page = write_report(out, required=False)
        if page is not None:
            done.files.append(page)
    return done


# ----- run directories -----------------------------------------------------------------------


def default_out(command: str, model: str) -> Path:
    """``runs/<command>-<model slug>-<local time>``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model.split(":")[-1].split("/")[-1]).strip("-")
    return Path("runs") / f"{command}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing run directory before any work, so nothing is half-written."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BadInput(f"output directory {out} already exists; pass --overwrite to replace it")


def read_scores(path: str | Path, model: Model | None = None) -> Scores:
    """The scores in ``path`` (a scores file or its run directory), checked against ``model``."""
    path = Path(path)
    scores = Scores.load(path / SCORES_FILE if path.is_dir() else path)
    if model is not None:
        scores.check_model(model, source=f"scores {path}")
    return scores


def write_report(run_dir: str | Path, required: bool = True) -> Path | None:
    """Write ``report.html`` for ``run_dir``. Without the report's plotting dependencies this
    is bad input when ``required``, and skipped otherwise."""
    run_dir = Path(run_dir)
    if required and not (run_dir / "sweep.json").is_file():
        raise BadInput(f"{run_dir}: no sweep.json in this run directory")
    try:
        from canfast.report import write_report as draw
    except ImportError:
        if required:
            raise BadInput("the report module is not available in this installation") from None
        return None
    return draw(run_dir)


# ----- neurons and generations ---------------------------------------------------------------


def top_neuron_ids(path: Path, k: int | None) -> list[str]:
    """The ids of the first ``k`` neurons of ``neurons.json`` (or of its run directory)."""
    from canfast.io import read_json

    path = path / NEURONS_FILE if path.is_dir() else path
    records = read_json(path)
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and "neuron" in r for r in records
    ):
        raise BadInput(f"{path}: expected a list of {{'neuron': ...}} records")
    if k is None:
        raise BadInput("--neurons needs --k, the number of top neurons to mask")
    return [r["neuron"] for r in records[:k]]


def compare_generations(
    model: Model, samples: Sequence[Sample], neurons: NeuronSet, max_new_tokens: int = 32
) -> list[dict]:
    """The unmasked and the masked greedy answer of every sample, one record each."""
    from canfast import generate

    for site_name, _ in neurons:
        model.site(site_name)
    base = generate(model, samples, max_new_tokens=max_new_tokens)
    changed = generate(model, samples, neurons, max_new_tokens=max_new_tokens)
    return [
        {"prompt": s.prompt, "base": b, "masked": a}
        for s, b, a in zip(samples, base, changed, strict=True)
    ]


# ----- the site map --------------------------------------------------------------------------


def site_records(sites: Sequence[Site]) -> list[dict]:
    """One record per site: name, component, layer, kind, channels and module path."""
    return [
        {
            "site": s.name,
            "component": s.component,
            "layer": s.layer,
            "kind": s.kind,
            "channels": s.channels,
            "module": s.module_path,
        }
        for s in sites
    ]


def component_totals(sites: Sequence[Site]) -> list[list]:
    """``[component, sites, neurons]`` per component in model order, then the total."""
    totals: dict[str, list[int]] = {}
    for s in sites:
        count = totals.setdefault(s.component, [0, 0])
        count[0] += 1
        count[1] += s.channels
    rows = [[c, n, channels] for c, (n, channels) in totals.items()]
    rows.append(["total", sum(r[1] for r in rows), sum(r[2] for r in rows)])
    return rows
