"""The report's figures, each returned as PNG bytes.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through
pyplot: pyplot would switch the global backend of whoever imported canfast and keep every
figure alive in its registry.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from canfast.report.placement import Count, HeatMap, Placement
from canfast.sweep.result import SweepResult

CAN_COLOR = "#1f5fbf"
RANDOM_COLOR = "#808080"
ONSET_COLOR = "#e08a00"
COLLAPSE_COLOR = "#c0282d"
COMPONENT_COLORS = {
    "vision": "#4c9a2a",
    "projector": "#8e5bb5",
    "qformer": "#d17a22",
    "language": "#1f5fbf",
}
DPI = 110
# Rank plots of millions of neurons keep this many log-spaced points: the PNG stays small and
# the shape of the tail is unchanged.
RANK_POINTS = 2000
MAX_ROW_LABELS = 40
# Neuron counts read as 1, 10, 1,000 rather than powers of ten.
PLAIN = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    # Without a fixed date and software tag, the same run would give different bytes each time.
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _plottable(ys: list[float], ceiling: float) -> np.ndarray:
    # A perplexity that overflowed is the strongest collapse there is: draw it at the top of
    # the axes rather than dropping the point.
    values = np.asarray(ys, dtype=np.float64)
    return np.nan_to_num(values, nan=np.nan, posinf=ceiling, neginf=np.nan)


def collapse_curve(sweep: SweepResult) -> bytes:
    """log10 PPL ratio against k (log x): CAN, the random seeds and their band, tau, k1, k*."""
    ppl0, tau, onset = sweep.ppl0, sweep.tau, sweep.onset
    seeds = sweep.random
    curves = [c.log10_ratio(ppl0) for c in (sweep.curve, *seeds)]
    finite = [v for c in curves for v in c if math.isfinite(v)]
    top = max([tau * 1.25, *(v * 1.08 for v in finite)])
    bottom = min([0.0, *finite]) - 0.05 * top

    fig = Figure(figsize=(10.0, 4.6))
    ax = fig.add_subplot()
    if seeds:
        for i, seed in enumerate(seeds):
            ax.plot(
                seed.k,
                _plottable(seed.log10_ratio(ppl0), top),
                color=RANDOM_COLOR,
                linewidth=0.7,
                alpha=0.55,
                label="random, each seed" if i == 0 else None,
            )
        # The band spans only the k every seed measured; narrowed stage searches add k values
        # that a single seed owns.
        shared = sorted(set.intersection(*(set(s.k) for s in seeds)))
        if shared:
            by_k = [dict(zip(s.k, _plottable(s.log10_ratio(ppl0), top))) for s in seeds]
            table = np.array([[values[k] for k in shared] for values in by_k])
            with warnings.catch_warnings():
                # A k where every seed's metric is NaN leaves a gap, which is what it should do.
                warnings.simplefilter("ignore", RuntimeWarning)
                low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
                middle = np.nanmedian(table, axis=0)
            ax.fill_between(
                shared,
                low,
                high,
                color=RANDOM_COLOR,
                alpha=0.2,
                linewidth=0,
                label=f"random, min-max of {len(seeds)} seeds",
            )
            ax.plot(
                shared,
                middle,
                color=RANDOM_COLOR,
                linestyle="--",
                linewidth=1.4,
                label="random, median",
            )
    if sweep.curve.k:
        ax.plot(
            sweep.curve.k,
            _plottable(sweep.curve.log10_ratio(ppl0), top),
            color=CAN_COLOR,
            marker="o",
            markersize=3,
            linewidth=1.8,
            label="CAN top-k",
        )
    ax.axhline(tau, color=COLLAPSE_COLOR, linestyle="--", linewidth=1, label=f"tau = {tau:g}")
    ax.axhline(
        math.log10(onset),
        color=ONSET_COLOR,
        linestyle=":",
        linewidth=1,
        label=f"onset ({onset:g}x PPL_0)",
    )
    for k, color, name in (
        (sweep.k1, ONSET_COLOR, "k1"),
        (sweep.k_star, COLLAPSE_COLOR, "k*"),
        (sweep.random_k_star, RANDOM_COLOR, "random k*"),
    ):
        if k is not None:
            ax.axvline(k, color=color, linewidth=1, alpha=0.8)
            # Vertical labels beside their lines stay apart even when k1 and k* are neighbours.
            ax.annotate(
                f"{name}={k:,g}",
                (k, top),
                xytext=(-2, -4),
                textcoords="offset points",
                rotation=90,
                ha="right",
                va="top",
                color=color,
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PLAIN)
    ax.set_ylim(bottom, top)
    ax.set_xlabel("k, neurons masked (log scale)")
    ax.set_ylabel("log10(PPL_k / PPL_0)")
    ax.set_title(f"Collapse curve (PPL_0 = {ppl0:.4g})")
    ax.grid(True, which="both", alpha=0.25)
    # Outside the axes: inside, any corner hides one of the curves that rise there.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return _png(fig)


def _bars(ax, counts: list[Count], title: str, colors: list[str], rotate: bool) -> None:
    labels = [c.group for c in counts]
    ax.bar(range(len(counts)), [c.count for c in counts], color=colors)
    ax.set_xticks(range(len(counts)))
    ax.set_xticklabels(labels, rotation=90 if rotate else 0, fontsize=7 if rotate else 9)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("neurons")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, axis="y", alpha=0.25)


def placement_bars(place: Placement) -> bytes:
    """Three bar charts: top-k neurons per component, per kind, per component.layer."""
    fig = Figure(figsize=(10.0, 5.6))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.15])

    def color(group: str) -> str:
        return COMPONENT_COLORS.get(group.partition(".")[0], CAN_COLOR)

    _bars(
        fig.add_subplot(grid[0, 0]),
        place.by_component,
        "per component",
        [color(c.group) for c in place.by_component],
        rotate=False,
    )
    _bars(
        fig.add_subplot(grid[0, 1]),
        place.by_kind,
        "per kind",
        [CAN_COLOR] * len(place.by_kind),
        rotate=False,
    )
    _bars(
        fig.add_subplot(grid[1, :]),
        place.by_layer,
        "per layer",
        [color(c.group) for c in place.by_layer],
        rotate=True,
    )
    fig.suptitle(f"Where the top {place.k} CAN neurons sit")
    fig.tight_layout()
    return _png(fig)


def heat_map(hm: HeatMap) -> bytes:
    """Sites (rows) by channels (columns) of one component, coloured by log10 score."""
    with np.errstate(divide="ignore", invalid="ignore"):
        shown = np.log10(np.where(hm.values > 0, hm.values, np.nan))
    finite = shown[np.isfinite(shown)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    height = min(9.0, 1.6 + 0.22 * len(hm.rows))
    fig = Figure(figsize=(10.0, height))
    ax = fig.add_subplot()
    cmap = _colormap()
    image = ax.imshow(
        np.ma.masked_invalid(shown),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        norm=Normalize(low, high if high > low else low + 1),
        extent=(0, hm.values.shape[1] * hm.bin_width, len(hm.rows) - 0.5, -0.5),
    )
    if hm.marks:
        rows, cols = zip(*hm.marks)
        ax.scatter(
            [(c + 0.5) * hm.bin_width for c in cols],
            rows,
            marker="x",
            s=22,
            color="#00e5ff",
            linewidths=1.2,
            label="top-k neuron",
        )
        ax.legend(fontsize=8, loc="upper right", framealpha=0.8)
    # A 32-layer model has ~100 rows; every label would overprint, so label every n-th row.
    step = math.ceil(len(hm.rows) / MAX_ROW_LABELS)
    ax.set_yticks(range(0, len(hm.rows), step))
    ax.set_yticklabels(hm.rows[::step], fontsize=7 if len(hm.rows) > 24 else 8)
    binned = f", max over bins of {hm.bin_width} channels" if hm.bin_width > 1 else ""
    ax.set_xlabel(f"channel{binned}")
    ax.set_title(f"{hm.component}: CAN score per channel (log10)")
    fig.colorbar(image, ax=ax, label="log10 score", fraction=0.04, pad=0.02)
    fig.tight_layout()
    return _png(fig)


def _colormap():
    from matplotlib import colormaps

    # Padding (sites narrower than the widest) and zero scores read as empty, not as low.
    return colormaps["magma"].with_extremes(bad="#eeeeee")


def score_rank(scores: np.ndarray, k_star: int | None, k_shown: int) -> bytes | None:
    """Every neuron's score against its rank, log-log: how few neurons carry the mass.

    None when no score is positive: a log axis has nothing to show then.
    """
    ordered = np.sort(scores[np.isfinite(scores)])[::-1]
    n = ordered.size
    if not n or ordered[0] <= 0:
        return None
    ranks = np.unique(np.geomspace(1, max(n, 1), num=min(n, RANK_POINTS)).astype(np.int64))
    fig = Figure(figsize=(8.0, 3.6))
    ax = fig.add_subplot()
    positive = ordered[ranks - 1] > 0
    ax.plot(ranks[positive], ordered[ranks - 1][positive], color=CAN_COLOR, linewidth=1.6)
    mark = k_star if k_star is not None else k_shown
    if 0 < mark <= n and ordered[mark - 1] > 0:
        label = f"k*={mark}" if k_star is not None else f"k={mark}"
        ax.axvline(mark, color=COLLAPSE_COLOR if k_star else ONSET_COLOR, linewidth=1)
        ax.annotate(label, (mark, ordered[mark - 1]), xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(PLAIN)
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("CAN score")
    ax.set_title(f"CAN scores by rank ({n:,} neurons)")
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    return _png(fig)
