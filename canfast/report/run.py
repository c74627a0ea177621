"""Read a run directory into one object the report draws from: the sweep through
:meth:`SweepResult.load`, the scores and the ranking beside it.

Only ``sweep.json`` is required: a sweep given ``--scores`` from elsewhere writes no
``scores.safetensors`` or ``neurons.json`` of its own, and a ``random`` sweep writes no
generations. Each missing piece simply drops its section from the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from canfast.errors import BadInput
from canfast.io import read_json
from canfast.score import Scores
from canfast.sites import COMPONENTS, KINDS
from canfast.sweep.result import SweepResult

# Neurons shown in "where the top-k sit" when the run never collapsed, so there is no k*.
DEFAULT_TOP_K = 16


@dataclass(frozen=True)
class SiteName:
    """The parts of ``<component>.<layer>[.<expert>].<kind>``; odd names keep the whole name as
    component. ``expert`` is ``e<k>`` or ``shared`` for mixture-of-experts sites."""

    name: str
    component: str
    layer: int | None
    kind: str
    expert: str | None = None

    @classmethod
    def parse(cls, name: str) -> SiteName:
        parts = name.split(".")
        if len(parts) == 3 and parts[1].isdigit():
            return cls(name, parts[0], int(parts[1]), parts[2])
        if len(parts) == 4 and parts[1].isdigit():
            return cls(name, parts[0], int(parts[1]), parts[3], parts[2])
        return cls(name, name, None, "?")

    def sort_key(self) -> tuple:
        """Model order: components as in the forward pass, then layer, then kind."""
        comp = COMPONENTS.index(self.component) if self.component in COMPONENTS else len(COMPONENTS)
        kind = KINDS.index(self.kind) if self.kind in KINDS else len(KINDS)
        return (comp, self.component, -1 if self.layer is None else self.layer, kind, self.name)


def site_order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: SiteName.parse(n).sort_key())


@dataclass
class Run:
    """Everything the report shows, read from one run directory."""

    path: Path
    sweep: SweepResult
    scores: Scores | None = None
    top: list[tuple[str, int, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    name: str = ""  # the run's name on the page (a run is drawn in its staging directory)

    @property
    def k_star(self) -> int | None:
        return self.sweep.k_star

    @property
    def generations(self) -> list[dict]:
        return self.sweep.generations

    @property
    def model(self) -> str | None:
        """The model's name, from the sweep or else from the scores."""
        return self.sweep.info.get("model") or self.meta.get("model")

    @property
    def top_k(self) -> int:
        """The k whose neurons the placement section shows: k* if the run collapsed."""
        k = self.k_star if self.k_star is not None else DEFAULT_TOP_K
        return min(k, len(self.top)) if self.top else k

    @property
    def meta(self) -> dict[str, str]:
        return dict(self.scores.meta) if self.scores is not None else {}


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """Read ``sweep.json`` and whatever else the run directory holds; ``name``: the run's name
    (default: the directory's)."""
    path = Path(run_dir)
    run = Run(path, SweepResult.load(path), name=name or path.name)
    if (path / "scores.safetensors").is_file():
        run.scores = Scores.load(path / "scores.safetensors")
    else:
        run.notes.append("scores.safetensors is not in this run directory: no heat maps.")
    wanted = max(run.k_star or 0, DEFAULT_TOP_K)
    if (path / "neurons.json").is_file():
        run.top = _top_from_records(read_json(path / "neurons.json"), wanted, path)
    elif run.scores is not None:
        run.top = _top_from_scores(run.scores, wanted)
    else:
        run.notes.append("neither neurons.json nor scores.safetensors is here: no placement.")
    return run


def _top_from_records(records, k: int, path: Path) -> list[tuple[str, int, float]]:
    # neurons.json is the very ranking the sweep masked, ties included, so it wins over a
    # re-ranking of the scores.
    if not isinstance(records, list):
        raise BadInput(f"{path / 'neurons.json'}: expected a list of neuron records")
    top = []
    for record in records[:k]:
        try:
            site, _, channel = str(record["neuron"]).rpartition(":")
            top.append((site, int(channel), float(record.get("score", math.nan))))
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{path / 'neurons.json'}: malformed record {record!r}") from None
    return top


def _top_from_scores(scores: Scores, k: int) -> list[tuple[str, int, float]]:
    # torch.topk over the concatenation avoids materialising the full ranking of a 7B model.
    names = site_order(scores.sites)
    flat = torch.cat([scores.values[n].float().flatten() for n in names])
    sizes = [scores.values[n].numel() for n in names]
    starts = torch.tensor([0, *sizes]).cumsum(0)
    values, index = torch.topk(flat, min(k, flat.numel()))
    top = []
    for value, i in zip(values.tolist(), index.tolist()):
        owner = int(torch.searchsorted(starts, i, right=True)) - 1
        top.append((names[owner], i - int(starts[owner]), value))
    return top
