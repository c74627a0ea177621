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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from canfast import distributed
from canfast.data import Sample, load_data
from canfast.errors import BadInput
from canfast.io import CHUNKS, RunDir, partial_path
from canfast.model import Model, load, quiet_transformers
from canfast.objective import Objective, with_targets
from canfast.ops.registry import kernels_for
from canfast.score import Scores, check_alpha, data_fingerprint, score
from canfast.sites import NeuronSet, Site
from canfast.sweep import StrategyResult, SweepConfig, SweepJob, sweep_by
from canfast.timing import Timings
from canfast.work import Work

DEFAULT_MODEL = "builtin:tiny-llava"
DEFAULT_DATA = "builtin:shapes"
SCORES_FILE = "scores.safetensors"
NEURONS_FILE = "neurons.json"


@dataclass
class ModelConfig:
    """Which model to load and where: a Hub id, a local directory or ``builtin:NAME``.

    ``quiet`` keeps transformers' advisory warnings and progress bars off a terminal that is
    not one (the command line sets it). ``ffn_map`` describes the FFN blocks of a family
    canfast has no rule for (a JSON file or a dict, :mod:`canfast.adapters.user_map`).
    Prompts use the model's chat template when it has one, unless ``chat_template`` is False or
    ``prompt_template`` (a string with ``{prompt}``) is given.
    """

    name: str = DEFAULT_MODEL
    dtype: str | None = None
    device: str | None = None
    device_map: str | None = None
    trust_remote_code: bool = False
    quiet: bool = False
    ffn_map: str | dict | None = None
    prompt_template: str | None = None
    chat_template: bool = True
    task: str = "auto"
    allow_pickle: bool = False

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
            ffn_map=self.ffn_map,
            prompt_template=self.prompt_template,
            chat_template=self.chat_template,
            task=self.task,
            allow_pickle=self.allow_pickle,
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
    scoring run) and every file written. ``leader`` is False on the ranks of a torchrun job that
    computed their share and wrote nothing."""

    out: Path
    scores: Scores
    result: StrategyResult | None = None
    files: list[Path] = field(default_factory=list)
    failed: str | None = None
    leader: bool = True
    resumed: int = 0


class Interrupted(Exception):
    """A run stopped by a signal, its finished work kept for ``--resume``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def run(
    model: ModelConfig | Model,
    data: DataConfig | None = None,
    sites: SiteConfig | None = None,
    scoring: ScoreConfig | None = None,
    sweep: SweepConfig | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    report: bool = True,
    resume: bool = False,
) -> RunOutcome:
    """Score (or read the scores), sweep when ``sweep`` is given, and write the run directory.

    Writes ``scores.safetensors`` and ``neurons.json`` (read scores: as narrowed to the selected
    sites), the strategy's own files, and ``report.html`` when the strategy has one. ``out``
    defaults to ``runs/<score|sweep>-MODEL-TIME``; an existing non-empty one needs
    ``overwrite``.

    A sweep keeps each finished chunk of its work as it goes: after a kill, ``resume=True`` with
    the same arguments skips what was done and writes the files an uninterrupted run would have.
    Started by ``torchrun``, every rank calls ``run`` alike: the ranks share the chunks, and rank
    0 writes the files.
    """
    data, sites = data or DataConfig(), sites or SiteConfig()
    scoring = scoring or ScoreConfig()
    check_alpha(scoring.alpha)
    strategy = sweep.check() if sweep is not None else None
    if resume and sweep is None:
        raise BadInput("--resume applies to sweeps and scans")
    if resume and out is None:
        raise BadInput("--resume needs --out, the run directory of the run to go on with")
    name = model.name if isinstance(model, Model | ModelConfig) else str(model)
    device = model.device if isinstance(model, ModelConfig) else None
    job = distributed.join(device)
    if job.distributed and out is None:
        raise BadInput("a torchrun job needs --out: every rank must name the same run")
    out = Path(out) if out is not None else default_out("sweep" if sweep else "score", name)
    if isinstance(model, ModelConfig) and job.distributed:
        model = replace(model, device=distributed.rank_device(model.device, job))
    command = "sweep" if sweep else "score"
    # Checked and locked before any work, by rank 0 for the job; filled in a staging directory
    # (for a sweep, the partial run that --resume takes up); swapped in whole.
    run_dir = RunDir(out, overwrite, command=command, resumable=sweep is not None, resume=resume)
    problem = None
    if job.leader:
        try:
            run_dir.open()
        except BadInput as exc:
            problem = exc
    if not distributed.all_agree(problem is None, job):
        if problem is not None:
            raise problem
        raise SystemExit(2)  # rank 0 said why
    if resume and job.leader and not run_dir.resumed:
        # Said before the work, not after it: a mistyped --out would otherwise cost a whole run.
        print(
            f"canfast: {out} holds no finished work to resume: the run starts from the beginning",
            file=sys.stderr,
        )
    try:
        work = _work(run_dir, out, sweep, job)
        done = _run(run_dir, work, job, model, data, sites, scoring, sweep, strategy, report)
        done.resumed = run_dir.resumed
        return done
    except KeyboardInterrupt:
        raise Interrupted(_stopped(run_dir, "interrupted"), 130) from None
    except SystemExit as exc:
        if exc.code == 143:
            raise Interrupted(_stopped(run_dir, "terminated"), 143) from None
        raise
    finally:
        run_dir.close() if job.leader else None
        distributed.leave()


def _work(run_dir: RunDir, out: Path, sweep, job) -> Work:
    if sweep is None:
        return Work(job=job)
    return Work(run_dir.chunks if job.leader else partial_path(out) / CHUNKS, job)


def _stopped(run_dir: RunDir, how: str) -> str:
    """What an interrupted run says: where its finished work is, and how to go on."""
    run_dir.close()
    if run_dir.kept is None:
        return f"{how}; nothing was finished, and {run_dir.path} is as it was"
    return (
        f"{how}; the finished work is kept in {run_dir.kept}: run the same command with "
        "--resume to go on"
    )


def _run(run_dir, work, job, model, data, sites, scoring, sweep, strategy, report) -> RunOutcome:
    _pin(run_dir, job, _options(model, data, sites, scoring, sweep))
    samples = data.load()
    loaded = model.load() if isinstance(model, ModelConfig) else model
    _check_backend(scoring.backend, loaded)
    # A Model passed in keeps its own setting once the run is over.
    kept, loaded.score_eos = loaded.score_eos, data.score_eos
    try:
        scores, result = _compute(
            run_dir, work, job, loaded, samples, data, sites, scoring, sweep, strategy
        )
    finally:
        loaded.score_eos = kept
    if not job.leader:
        return RunOutcome(run_dir.path, scores, result, leader=False)
    shown = strategy if report else None
    return _write_run(run_dir, scores, result, shown)


def _options(model, data, sites, scoring, sweep) -> dict:
    """Every option that changes a number of the run, as the manifest pins it."""
    import torch

    from canfast import __version__

    config = asdict(model) if isinstance(model, ModelConfig) else {"name": model.name}
    for ignored in ("quiet", "device_map"):
        config.pop(ignored, None)
    return {
        "canfast_version": __version__,
        "torch_version": torch.__version__,
        "model": config,
        "data": {
            "source": data.source if isinstance(data.source, str) else "samples",
            **{k: getattr(data, k) for k in ("prompt", "limit", "targets", "max_new_tokens")},
            **{k: getattr(data, k) for k in ("batch_size", "score_eos")},
        },
        "sites": asdict(sites) | {k: list(v) for k, v in asdict(sites).items() if k != "unit"},
        "scoring": {
            # Scores read from a file have their own alpha, in that file.
            "alpha": scoring.alpha if scoring.path is None else None,
            "backend": scoring.backend,
            "objective": None
            if scoring.objective is None
            else getattr(scoring.objective, "__name__", "custom"),
            "scores": None if scoring.path is None else str(scoring.path),
        },
        "sweep": None if sweep is None else _jsonable(asdict(sweep)),
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _fixed(run_dir: RunDir, job, record: dict) -> None:
    """Pin what the run computes on, and make sure every rank computes on the same."""
    import json

    if not distributed.same_everywhere(json.dumps(record, sort_keys=True), job):
        raise RuntimeError(
            "the ranks of this job disagree on " + ", ".join(record) + " (non-deterministic "
            "targets or scores?); run it in one process"
        )
    _pin(run_dir, job, record)


def _check_backend(backend: str, model: Model) -> None:
    """Refuse, before any work, a kernel backend that cannot run the model's tensors: the first
    product would raise inside the forward pass."""
    if model.device.type == "meta":
        return  # the architecture alone: refused where it would run
    try:
        kernels_for(
            backend, f"--backend {backend}", torch.empty(0, dtype=model.dtype, device=model.device)
        )
    except (ValueError, RuntimeError) as exc:
        hint = ""
        if backend == "triton" and model.device.type == "cpu":
            hint = " (TRITON_INTERPRET=1 runs its kernels on the CPU, in Triton's interpreter)"
        raise BadInput(f"{exc}{hint}") from None


def _pin(run_dir: RunDir, job, record: dict) -> None:
    """Pin ``record`` in the manifest (rank 0); a refused resume stops every rank."""
    problem = None
    if job.leader:
        try:
            run_dir.pin(record)
        except BadInput as exc:
            problem = exc
    if not distributed.all_agree(problem is None, job):
        if problem is not None:
            raise problem
        raise SystemExit(2)  # rank 0 said why


def _compute(run_dir, work, job, loaded, samples, data, sites, scoring, sweep, strategy):
    """The scores (read or computed) and the strategy's result (None without a sweep)."""
    chosen = [s.name for s in sites.select(loaded)]
    scores = None
    if scoring.path is not None:
        scores = read_scores(scoring.path, loaded)
        scores, chosen = _selected_scores(scores, sites, chosen, scoring.path)
    result = None
    if sweep is None:
        if scores is None:
            scores = _score(loaded, samples, sites, scoring, data, chosen, data.targets)
    else:
        ks = sweep.ks(sum(loaded.site(s).channels for s in chosen))
        timings = Timings()
        with timings.measure("targets"):
            samples = with_targets(
                loaded,
                samples,
                data.targets,
                data.max_new_tokens,
                data.batch_size,
                scoring.objective,
            )
        _fixed(
            run_dir,
            job,
            {
                "model_fingerprint": loaded.fingerprint(),
                "data_fingerprint": data_fingerprint(samples),
                "selected_sites": chosen,
            },
        )
        staged = work.journal.parent / SCORES_FILE if work.journal is not None else None
        if scores is None and staged is not None and staged.is_file():
            scores = read_scores(staged, loaded)  # scored before the run was interrupted
        if scores is None:
            scores = _score(loaded, samples, sites, scoring, data, chosen, "given")
            scores.meta["targets"] = data.targets
            if job.leader and staged is not None:
                scores.save(staged)
        _fixed(run_dir, job, {"scores_fingerprint": scores_fingerprint(scores)})
        sweep_job = SweepJob(
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
            work=work,
        )
        result = strategy.run(sweep_job)
        if sweep.by:
            result.info["by"] = {g: sweep_by(g, sweep_job) for g in sweep.by}
    return scores, result


def _selected_scores(scores: Scores, sites: SiteConfig, chosen: list[str], path) -> tuple:
    """Scores read from a file, as the run's site selection takes them: of the run's unit, and
    narrowed to the selected sites among those scored (a selection never adds a site the scores
    lack). Returns the scores and the sites they now hold, in their order."""
    unit = scores.meta.get("unit", "out")
    if unit != sites.unit:
        raise BadInput(
            f"scores {path} are of unit {unit!r} and this run's sites of {sites.unit!r}: "
            f"select the same unit (--unit {unit})"
        )
    wanted = set(chosen)
    kept = [site for site in scores.sites if site in wanted]
    if not kept:
        raise BadInput(f"scores {path} hold none of the selected sites")
    if len(kept) < len(scores.sites):
        scores = scores.only(kept)
    return scores, kept


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


def _write_run(run_dir, scores, result, strategy) -> RunOutcome:
    """Write the run's files into its staging directory, the result first, and commit it.

    The scores and their ranking are written whether computed or read (``--scores``, narrowed
    to the selected sites): a run directory holds the ranking it masked, and its report draws
    the heat maps and the placement from it.

    A failure after the result (the report) leaves the result, committed, and says what failed
    in the manifest and in ``RunOutcome.failed``: no later step can lose a sweep."""
    from canfast.io import neuron_records, write_json

    stage = run_dir.stage
    done = RunOutcome(run_dir.path, scores, result)
    if not (stage / SCORES_FILE).is_file():  # a sweep keeps its scores as it goes
        scores.save(stage / SCORES_FILE)
    write_json(stage / NEURONS_FILE, neuron_records(scores.ranking()))
    done.files += [SCORES_FILE, NEURONS_FILE]
    if result is not None:
        done.files += [Path(p).name for p in result.write(stage)]
    if strategy and strategy.report:
        try:
            page = write_report(stage, required=False, name=run_dir.path.name)
        except Exception as exc:  # noqa: BLE001 - any failure here must not lose the result
            done.failed = f"report: {type(exc).__name__}: {exc}"
        else:
            if page is not None:
                done.files.append(Path(page).name)
    run_dir.commit(failed=done.failed)
    done.files = [run_dir.path / name for name in done.files]
    return done


def scores_fingerprint(scores: Scores) -> str:
    """A digest of the scores' values, site by site, as they are saved (float32)."""
    import hashlib

    digest = hashlib.sha256()
    for site, values in scores.values.items():
        digest.update(site.encode())
        digest.update(values.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----- run directories -----------------------------------------------------------------------


def default_out(command: str, model: str) -> Path:
    """``runs/<command>-<model slug>-<local time>``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model.split(":")[-1].split("/")[-1]).strip("-")
    return Path("runs") / f"{command}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_scores(path: str | Path, model: Model | None = None) -> Scores:
    """The scores in ``path`` (a scores file or its run directory), checked against ``model``."""
    path = Path(path)
    scores = Scores.load(path / SCORES_FILE if path.is_dir() else path)
    if model is not None:
        scores.check_model(model, source=f"scores {path}")
    return scores


def write_report(
    run_dir: str | Path, required: bool = True, name: str | None = None
) -> Path | None:
    """Write ``report.html`` for ``run_dir``. Without the report's plotting dependencies this
    is bad input when ``required``, and skipped otherwise. ``name``: the run's name on the page,
    for a run drawn in its staging directory (default: the directory's)."""
    run_dir = Path(run_dir)
    if required and not any((run_dir / f).is_file() for f in ("sweep.json", "scan.json")):
        raise BadInput(f"{run_dir}: no sweep.json or scan.json in this run directory")
    try:
        from canfast.report import write_report as draw
    except ImportError:
        if required:
            raise BadInput("the report module is not available in this installation") from None
        return None
    if not required:
        return draw(run_dir, name)  # into a run being written
    # Added to a finished run whole: a failed report leaves the run as it was.
    with RunDir(run_dir, amend=True, command="report") as amend:
        page = draw(amend.stage, run_dir.name)
    return run_dir / Path(page).name


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
    for number, record in enumerate(records, start=1):
        if not isinstance(record["neuron"], str):
            raise BadInput(
                f"{path}: record {number} has neuron {record['neuron']!r}, not a neuron id "
                "string such as 'language.3.down:17'"
            )
    if k is None:
        raise BadInput("--neurons needs --k, the number of top neurons to mask")
    if k > len(records):
        raise BadInput(f"--k {k} is more than the {len(records)} neurons in {path}")
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
