"""The HTML report of a run: ``write_report(run_dir)`` turns what ``canfast sweep`` wrote into
``report.html`` and its PNGs, beside the run's other files.

The page shows the collapse curve against the random baseline, where the top-k neurons sit,
the per-group tables, the generations at the two stages and the run's parameters, under a
plain-language verdict computed from the numbers (``verdict``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from canfast.io import write_bytes, write_text
from canfast.report import figures, html
from canfast.report.placement import heat_maps, placement
from canfast.report.run import load_run
from canfast.report.verdict import verdict

REPORT = "report.html"
# The PNG names write_report owns in a run directory.
FIGURES = ("collapse.png", "placement.png", "score_rank.png", "heatmap_*.png")


class _Figures:
    """Writes each figure beside the page and remembers which, for the stale-file sweep."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.written: set[str] = set()

    def add(self, file: str, png: bytes, alt: str, caption: str) -> html.Image:
        write_bytes(self.path / file, png)
        self.written.add(file)
        return html.Image(file, png, alt, caption)

    def remove_stale(self) -> None:
        # A figure an earlier report drew but this one did not (a component since left out,
        # scores since removed) would otherwise sit beside the page and contradict it.
        for pattern in FIGURES:
            for old in self.path.glob(pattern):
                if old.name not in self.written:
                    old.unlink(missing_ok=True)


def write_report(run_dir: str | Path, name: str | None = None) -> Path:
    """Write ``report.html`` and its PNGs into ``run_dir``; return the page's path. ``name``:
    the run's name on the page (default: the directory's).

    Needs ``sweep.json``; ``scores.safetensors``, ``neurons.json`` and ``generations.jsonl``
    add their sections when present. Raises ``BadInput`` when the directory is not a run.
    """
    if not (Path(run_dir) / "sweep.json").is_file() and (Path(run_dir) / "scan.json").is_file():
        from canfast.report.scan import write_scan_report

        return write_scan_report(run_dir, name)
    run = load_run(run_dir, name)
    out = _Figures(run.path)
    body = [html.header(run, verdict(run.sweep))]
    anchors = [("collapse", "Collapse curve")]

    curve = out.add(
        "collapse.png",
        figures.collapse_curve(run.sweep),
        "collapse curve: log10 PPL ratio against k, CAN and random",
        "log10(PPL_k / PPL_0) against k: CAN top-k in blue, random sets in grey",
    )
    sections = [html.collapse_section(run, curve)]

    place = placement(run) if run.top else None
    if place is not None:
        bars = out.add(
            "placement.png",
            figures.placement_bars(place),
            f"top {place.k} neurons per component, kind and layer",
            f"The top {place.k} CAN neurons per component, kind and layer",
        )
        sections.append(html.placement_section(run, place, [bars]))
        anchors.append(("placement", "Top-k placement"))

    maps = heat_maps(run)
    if maps:
        images = [
            out.add(
                f"heatmap_{hm.component}.png",
                figures.heat_map(hm),
                f"{hm.component} heat map of CAN scores, sites by channels",
                f"{hm.component}: {len(hm.rows)} sites by {hm.channels:,} channels",
            )
            for hm in maps
        ]
        everything = np.concatenate(
            [t.double().flatten().numpy() for t in run.scores.values.values()]
        )
        rank_png = figures.score_rank(everything, run.k_star, run.top_k)
        rank = None
        if rank_png is not None:
            rank = out.add(
                "score_rank.png",
                rank_png,
                "CAN score against rank, log-log",
                "Every neuron's CAN score against its rank",
            )
        sections.append(html.heat_section(images, rank))
        anchors.append(("heatmaps", "Heat maps"))

    by = run.sweep.info.get("by")
    if isinstance(by, dict) and by:
        sections.append(html.by_section(by))
        anchors.append(("by", "Per group"))
    if run.generations:
        sections.append(html.generations_section(run))
        anchors.append(("generations", "Generations"))
    sections.append(html.parameters_section(run))
    anchors.append(("parameters", "Parameters"))
    if run.notes:
        sections.append(html.notes_section(run.notes))

    body.append(html.navigation(anchors))
    body.extend(sections)
    model = run.model or "run"
    page = write_text(run.path / REPORT, html.document(f"canfast report: {model}", body))
    out.remove_stale()
    return page


__all__ = ["REPORT", "load_run", "verdict", "write_report"]
