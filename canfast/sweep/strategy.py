"""What a sweep strategy is, and the registry that finds one by name.

A strategy is a function from a :class:`SweepJob` (the model, samples with their targets, the
ranking, the options) to a result. Results differ by strategy: a collapse sweep returns a
:class:`~canfast.sweep.result.SweepResult` that writes ``sweep.json``, an exhaustive scan writes
its own files. So the pipeline never names a file: it asks the result to write itself and to
summarise itself (:class:`StrategyResult`).

Add a strategy with one module that decorates its function with :func:`register`, imported by
``canfast/sweep/__init__.py``; ``canfast sweep --sweep-kind`` then offers it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from canfast.data import Sample
from canfast.errors import BadInput
from canfast.model import Model
from canfast.objective import Objective
from canfast.score import Scores
from canfast.sites import NeuronSet
from canfast.sweep.evaluator import METRICS, Evaluator
from canfast.sweep.schedule import default_schedule, parse_schedule
from canfast.timing import Timings
from canfast.work import Work

CRITERIA = ("ratio", "delta")


@dataclass
class SweepConfig:
    """The options of a sweep, whatever its strategy.

    - ``kind``: the registered strategy (``progressive``, ``random``, ...).
    - ``schedule``: the k grid, as k values or as ``--schedule`` text (``"1,2,4"``, ``"1:64"``);
      None for every k up to 16, then steps of 1.25x.
    - ``criterion``: ``ratio``, collapse when ``log10(PPL_k / PPL_0) >= tau`` (for the NLL);
      ``delta``, when the mean loss rose by ``tau`` (for losses that are not an NLL, whose
      exponential is no perplexity).
    - ``tau``: the collapse threshold of ``criterion``; ``onset``: degradation when
      ``PPL_k / PPL_0 >= onset``.
    - ``seeds``: random orderings for the baseline; ``metric``: ``ppl`` or ``gen-ppl``.
    - ``masks_per_pass``: neuron sets evaluated in one forward pass.
    - ``generations``: samples answered at k = 0, k1 and k*.
    - ``by``: groupings (component, kind, category) swept on their own as well.
    - ``search``: find k1 and k* by galloping and bisection instead of tracing the whole grid
      (far fewer evaluations; the curve holds only the points it evaluated).
    - ``verify_top``, ``calibrate``, ``screen``, ``max_batch_tokens``: the ``single`` scan's
      screening and block budget (see :func:`canfast.neuron_scan.scan`).
    """

    kind: str = "progressive"
    schedule: Sequence[int] | str | None = None
    tau: float = 1.0
    onset: float = 1.5
    seeds: int = 3
    metric: str = "ppl"
    masks_per_pass: int = 4
    generations: int = 4
    by: Sequence[str] = ()
    verify_top: int | None = None
    calibrate: int | None = None
    screen: str = "estimate"
    max_batch_tokens: int | None = None
    criterion: str = "ratio"
    search: bool = False

    def check(self) -> Strategy:
        """Refuse bad options before any work; return the strategy of ``kind``."""
        from canfast.sweep.groups import GROUPINGS

        chosen = find_strategy(self.kind)
        if self.metric not in METRICS:
            raise BadInput(f"unknown metric {self.metric!r}; choose {', '.join(METRICS)}")
        if self.tau <= 0:
            raise BadInput(f"tau must be positive, got {self.tau}")
        if self.criterion not in CRITERIA:
            raise BadInput(f"unknown criterion {self.criterion!r}; choose {', '.join(CRITERIA)}")
        if self.seeds < 0:
            raise BadInput(f"--seeds must be 0 or more, got {self.seeds}")
        for grouping in self.by:
            if grouping not in GROUPINGS:
                raise BadInput(f"unknown --by {grouping!r}; choose {', '.join(GROUPINGS)}")
        if self.search and not chosen.groups:
            raise BadInput(f"--search is not available for --sweep-kind {self.kind}")
        if self.search and self.schedule is not None:
            raise BadInput("--search chooses its own k values; drop --schedule")
        if self.by and not chosen.groups:
            raise BadInput(f"--by is not available for --sweep-kind {self.kind}")
        return chosen

    def log10_tau(self) -> float:
        """The collapse threshold as a log10 PPL ratio: ``tau`` itself for ``ratio``; for
        ``delta`` (a rise of the mean loss by ``tau``), ``tau / ln 10``."""
        return self.tau if self.criterion == "ratio" else self.tau / math.log(10)

    def ks(self, n_neurons: int) -> list[int]:
        """The k grid for ``n_neurons`` selected neurons, each k in 1..n_neurons."""
        if isinstance(self.schedule, str):
            return parse_schedule(self.schedule, n_neurons)
        ks = sorted(
            {k for k in (self.schedule or default_schedule(n_neurons)) if 0 < k <= n_neurons}
        )
        if not ks:
            raise BadInput(f"the schedule has no k between 1 and {n_neurons}")
        return ks


def site_channels(model: Model, ranking: Scores | NeuronSet) -> dict[str, int]:
    """The channels of every site a ranking covers: the pool random sets are drawn from."""
    names = ranking.sites if isinstance(ranking, Scores) else list(ranking.by_site())
    return {name: model.site(name).channels for name in names}


@dataclass
class SweepJob:
    """Everything a strategy needs. ``samples`` already carry the targets every loss is scored
    on; ``targets`` says where they came from (``self`` or ``given``), for the record."""

    model: Model
    samples: list[Sample]
    ranking: Scores | NeuronSet
    config: SweepConfig
    ks: list[int]
    targets: str = "given"
    batch_size: int = 8
    max_new_tokens: int = 32
    objective: Objective | None = None
    backend: str = "auto"
    progress: bool = True
    timings: Timings = field(default_factory=Timings)
    work: Work = field(default_factory=Work)

    @property
    def order(self) -> NeuronSet:
        """Every neuron of the ranking, best first."""
        return self.ranking.ranking() if isinstance(self.ranking, Scores) else self.ranking

    @property
    def pool(self) -> dict[str, int]:
        return site_channels(self.model, self.ranking)

    def evaluator(self) -> Evaluator:
        return Evaluator(
            self.model,
            self.samples,
            self.config.metric,
            self.batch_size,
            self.config.masks_per_pass,
            self.max_new_tokens,
            self.objective,
            self.backend,
            self.progress,
            self.work,
            sites=list(self.pool),
        )


class StrategyResult(Protocol):
    """What every strategy returns: it writes its own files and prints its own summary."""

    kind: str
    info: dict

    def write(self, run_dir: Path) -> list[Path]:
        """Write this result's files into ``run_dir``; return their paths."""
        ...

    def summary(self, ranking: NeuronSet | None = None) -> str:
        """The text printed at the end of ``canfast sweep``."""
        ...

    def summary_json(self) -> dict:
        """The headline numbers printed by ``canfast sweep --json``."""
        ...


@dataclass(frozen=True)
class Strategy:
    """A registered sweep strategy.

    ``groups``: whether ``--by`` applies (a per-group collapse sweep); ``report``: whether
    ``report.html`` can be drawn from its files.
    """

    name: str
    run: Callable[[SweepJob], StrategyResult]
    description: str
    groups: bool = False
    report: bool = False


_REGISTRY: dict[str, Strategy] = {}


def register(
    name: str, description: str, groups: bool = False, report: bool = False
) -> Callable[[Callable[[SweepJob], StrategyResult]], Callable[[SweepJob], StrategyResult]]:
    """Decorator: make ``run`` the strategy called ``name``."""

    def decorate(run: Callable[[SweepJob], StrategyResult]) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"sweep strategy {name!r} is registered twice")
        _REGISTRY[name] = Strategy(name, run, description, groups, report)
        return run

    return decorate


def find_strategy(name: str) -> Strategy:
    """The strategy registered as ``name``; bad input when there is none."""
    if name not in _REGISTRY:
        raise BadInput(f"unknown sweep kind {name!r}; choose {', '.join(strategy_names())}")
    return _REGISTRY[name]


def strategy_names() -> list[str]:
    """Every registered strategy, in registration order."""
    return list(_REGISTRY)


def run_strategy(job: SweepJob) -> StrategyResult:
    """Run ``job`` with the strategy its config names."""
    return find_strategy(job.config.kind).run(job)
