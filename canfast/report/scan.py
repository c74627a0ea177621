"""The report page of a single-neuron scan (``--sweep-kind single``): CAN against the exact
effect, the first-order estimate against it, and where the most harmful neurons sit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from canfast.io import write_bytes, write_text
from canfast.neuron_scan import Scan
from canfast.report import html
from canfast.report.figures import COMPONENT_COLORS, _png
from canfast.report.run import SiteName

SCAN_FIGURES = ("scan_can.png", "scan_estimate.png")


def _points(scan: Scan) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    delta, estimate, can, component = [], [], [], []
    for site in scan.sites:
        delta.append(scan[site].double().numpy())
        estimate.append(scan.estimate[site].double().numpy())
        can.append(scan.can[site].double().numpy())
        component += [SiteName.parse(site).component] * scan[site].numel()
    return np.concatenate(delta), np.concatenate(estimate), np.concatenate(can), component


def _scatter(x, y, component, xlabel, ylabel, title, log_x: bool, diagonal: bool) -> bytes:
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    keep = np.isfinite(x) & np.isfinite(y)
    if log_x:
        keep &= x > 0
    groups = np.array(component)
    for name in dict.fromkeys(component):
        chosen = keep & (groups == name)
        if chosen.any():
            ax.scatter(
                x[chosen],
                y[chosen],
                s=6,
                alpha=0.6,
                label=name,
                color=COMPONENT_COLORS.get(name, "#444444"),
            )
    if log_x:
        ax.set_xscale("log")
    # Exact deltas span decades on both sides of zero: symlog keeps the sign and the tail.
    finite = np.abs(y[keep]) if keep.any() else np.array([1.0])
    linear = max(float(np.quantile(finite, 0.5)), 1e-12) if finite.size else 1e-6
    ax.set_yscale("symlog", linthresh=linear)
    if diagonal and keep.any():
        low, high = float(np.min(x[keep])), float(np.max(x[keep]))
        ax.plot([low, high], [low, high], color="#999999", linewidth=0.8, linestyle="--")
        ax.set_xscale("symlog", linthresh=linear)
    ax.axhline(0.0, color="#cccccc", linewidth=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def write_scan_report(run_dir: str | Path, name: str | None = None) -> Path:
    """Write ``report.html`` and its PNGs for a run directory holding a scan; ``name``: the
    run's name on the page (default: the directory's)."""
    path = Path(run_dir)
    scan = Scan.load(path)
    overview = scan.overview
    delta, estimate, can, component = _points(scan)
    rho = overview.get("spearman", {})
    everything = rho.get("all", {})

    images = [
        html.Image(
            "scan_can.png",
            _scatter(
                can,
                delta,
                component,
                "CAN score (log)",
                "exact delta = log(PPL_j/PPL_0)",
                "CAN against the exact effect",
                log_x=True,
                diagonal=False,
            ),
            "CAN score against exact delta, log scale",
            f"Every neuron's CAN score against its exact delta; Spearman "
            f"{html.fmt(everything.get('can'))}",
        ),
        html.Image(
            "scan_estimate.png",
            _scatter(
                estimate,
                delta,
                component,
                "first-order estimate -(a . dL/da)",
                "exact delta",
                "Estimate against the exact effect",
                log_x=False,
                diagonal=True,
            ),
            "first-order estimate against exact delta",
            f"The first-order estimate against the exact delta (dashed: equal); Spearman "
            f"{html.fmt(everything.get('estimate'))}",
        ),
    ]
    for image in images:
        write_bytes(path / image.file, image.png)

    rows = []
    for i, record in enumerate(overview.get("top_neurons", [])):
        site, _, channel = record["neuron"].rpartition(":")
        where = SiteName.parse(site)
        rows.append(
            [
                i + 1,
                record["neuron"],
                where.component,
                where.layer,
                where.kind,
                int(channel),
                record["delta"],
                record["estimate"],
                record["can"],
                record["can_rank"],
            ]
        )
    corr_rows = [
        [
            "all",
            everything.get("neurons"),
            everything.get("can"),
            everything.get("estimate"),
            everything.get("can_vs_abs_delta"),
        ]
    ]
    for label, groups in (
        ("component", rho.get("by_component", {})),
        ("kind", rho.get("by_kind", {})),
    ):
        for group, values in groups.items():
            corr_rows.append(
                [
                    f"{label} {group}",
                    values.get("neurons"),
                    values.get("can"),
                    values.get("estimate"),
                    values.get("can_vs_abs_delta"),
                ]
            )
    overlap = overview.get("can_top_k_overlap", {})
    reading = (
        "delta is the exact change in mean target NLL when the neuron alone is removed "
        "(log of the perplexity ratio): positive means the model needs it. CAN ranks by "
        "magnitude only, so it is read against |delta| and against the sign: a neuron with a high "
        "CAN score and a delta near zero is one CAN over-rates; a large delta with a low CAN "
        "rank is one it misses."
    )
    parts = [
        html.paragraph(reading),
        html.table(
            ["group", "neurons", "Spearman CAN", "Spearman estimate", "CAN vs |delta|"],
            corr_rows,
            caption="Rank correlation with the exact delta",
        ),
    ]
    if overlap:
        parts.append(
            html.paragraph(
                "CAN's top-k contains "
                + ", ".join(f"{v} of the exact top {k}" for k, v in overlap.items())
                + "."
            )
        )
    screening = overview.get("screening")
    if screening:
        parts.append(
            html.paragraph(
                f"Screened by {screening['screen']}: {overview.get('exact_ablations')} of "
                f"{overview.get('neurons')} neurons ablated exactly; estimated recall of the "
                f"exact top {screening['verify_top']}: {html.fmt(screening.get('recall'))} "
                f"(95% lower bound {html.fmt(screening.get('recall_lower_95'))}). "
                f"{screening.get('method', '')}"
            )
        )
    parts += [image.html() for image in images]
    parts.append(
        html.table(
            [
                "rank",
                "neuron",
                "component",
                "layer",
                "kind",
                "channel",
                "exact delta",
                "estimate",
                "CAN",
                "CAN rank",
            ],
            rows,
            caption="The most harmful neurons to remove, by exact delta",
        )
    )
    timings = overview.get("timings", {})
    parts.append(
        html.paragraph(
            f"{overview.get('exact_ablations')} exact ablations in "
            f"{html.fmt(timings.get('exact_s'))} s "
            f"({html.fmt(timings.get('ablations_per_s'))} per second)."
        )
    )
    model = scan.meta.get("model", "run")
    body = [
        f"<h1>canfast: {html.escape(model)}</h1>"
        f"<p class='sub'>run {html.escape(name or path.name)} · single-neuron scan · canfast "
        "report</p>",
        html.section("scan", "Single-neuron scan", "".join(parts)),
    ]
    return write_text(path / "report.html", html.document(f"canfast scan: {model}", body))
