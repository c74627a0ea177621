"""Where the top-k neurons sit: counts per component, kind and layer, and the per-component
layer-by-channel score maps behind the heat maps. Pure numbers; drawing is in ``figures``."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from canfast.report.run import Run, SiteName, site_order
from canfast.sites import COMPONENTS, KINDS

# Columns of a heat map: wider sites are binned, so a 11008-channel Llama FFN still fits a page.
MAX_COLUMNS = 256


@dataclass
class Count:
    """Top-k neurons in one group, next to the group's size when the scores say it."""

    group: str
    count: int
    total: int | None = None

    @property
    def share(self) -> float | None:
        """Fraction of the group's own neurons that made the top k."""
        return self.count / self.total if self.total else None


@dataclass
class Placement:
    k: int
    neurons: list[tuple[str, int, float]]
    by_component: list[Count] = field(default_factory=list)
    by_kind: list[Count] = field(default_factory=list)
    by_layer: list[Count] = field(default_factory=list)
    by_expert: list[Count] = field(default_factory=list)  # mixture-of-experts models only


def placement(run: Run) -> Placement:
    """Count the top-k neurons of ``run`` per component, per kind and per component.layer."""
    k = run.top_k
    neurons = run.top[:k]
    sizes: dict[str, int] = {}
    if run.scores is not None:
        sizes = {name: int(t.numel()) for name, t in run.scores.values.items()}

    def group(key, order=None) -> list[Count]:
        counts: Counter[str] = Counter(key(SiteName.parse(site)) for site, _, _ in neurons)
        totals: Counter[str] = Counter()
        for name, size in sizes.items():
            totals[key(SiteName.parse(name))] += size
        groups = (set(counts) | set(totals)) - {None}
        ordered = sorted(groups, key=order) if order else _ordered(groups)
        return [Count(g, counts.get(g, 0), totals.get(g) or None) for g in ordered]

    def expert_order(g: str) -> tuple:
        return (g == "shared", int(g[1:]) if g[1:].isdigit() else -1, g)

    return Placement(
        k=k,
        neurons=neurons,
        by_component=group(lambda s: s.component),
        by_kind=group(lambda s: s.kind),
        by_layer=group(lambda s: s.component if s.layer is None else f"{s.component}.{s.layer}"),
        by_expert=group(lambda s: s.expert, expert_order),
    )


def _ordered(groups: set[str]) -> list[str]:
    def key(g: str) -> tuple:
        head, _, tail = g.partition(".")
        comp = COMPONENTS.index(head) if head in COMPONENTS else len(COMPONENTS)
        kind = KINDS.index(g) if g in KINDS else len(KINDS)
        layer = int(tail) if tail.isdigit() else -1
        return (comp, kind, head, layer, g)

    return sorted(groups, key=key)


@dataclass
class HeatMap:
    """One component's scores: ``values[row, col]`` is the largest score of ``bin_width``
    channels of site ``rows[row]``; NaN where the site has fewer channels than the widest."""

    component: str
    rows: list[str]
    values: np.ndarray
    bin_width: int
    channels: int
    marks: list[tuple[int, int]] = field(default_factory=list)


def heat_maps(run: Run, max_columns: int = MAX_COLUMNS) -> list[HeatMap]:
    """One map per component, rows in model order; ``marks`` are the top-k as (row, column)."""
    if run.scores is None:
        return []
    by_component: dict[str, list[str]] = {}
    for name in site_order(run.scores.sites):
        by_component.setdefault(SiteName.parse(name).component, []).append(name)
    top = run.top[: run.top_k]
    maps = []
    for component, rows in by_component.items():
        widest = max(run.scores.values[r].numel() for r in rows)
        # One bin width per component keeps the x axis a channel index shared by every row.
        width = max(1, math.ceil(widest / max_columns))
        columns = math.ceil(widest / width)
        grid = np.full((len(rows), columns), np.nan, dtype=np.float64)
        for i, name in enumerate(rows):
            scores = run.scores.values[name].double().flatten().numpy()
            filled = math.ceil(scores.size / width)
            padded = np.full(filled * width, -np.inf)
            padded[: scores.size] = scores
            grid[i, :filled] = padded.reshape(filled, width).max(axis=1)
        where = {name: i for i, name in enumerate(rows)}
        marks = [(where[s], c // width) for s, c, _ in top if s in where]
        maps.append(HeatMap(component, rows, grid, width, widest, marks))
    return maps
