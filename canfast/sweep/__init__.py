"""Sweeps: the collapse curve of a ranking, its stages, and the random baseline, run by
strategies registered by name (one module each)."""

from canfast.sweep import progressive, random  # noqa: F401  (registers the strategies)
from canfast.sweep.api import sweep
from canfast.sweep.evaluator import METRICS, Evaluator
from canfast.sweep.groups import GROUPINGS, sweep_by
from canfast.sweep.result import Curve, SweepResult
from canfast.sweep.schedule import default_schedule, parse_schedule
from canfast.sweep.strategy import (
    Strategy,
    StrategyResult,
    SweepConfig,
    SweepJob,
    find_strategy,
    register,
    run_strategy,
    strategy_names,
)

__all__ = [
    "GROUPINGS",
    "METRICS",
    "Curve",
    "Evaluator",
    "Strategy",
    "StrategyResult",
    "SweepConfig",
    "SweepJob",
    "SweepResult",
    "default_schedule",
    "parse_schedule",
    "register",
    "run_strategy",
    "find_strategy",
    "strategy_names",
    "sweep",
    "sweep_by",
]
