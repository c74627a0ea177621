"""The report page: one self-contained HTML file, images inlined as data URIs, no scripts and
no outside resources, so it opens from disk, offline, years later.

Every string that comes from a run (prompts, answers, model names, group names) passes
through ``escape``: a prompt may well contain ``<image>``.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape as _escape

from canfast import __version__
from canfast.report.placement import Count, Placement
from canfast.report.run import Run
from canfast.report.verdict import times
from canfast.sweep.result import COLLAPSE_RULE

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif;
       max-width: 1120px; margin: 2em auto; padding: 0 1em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-top: 1.4em; }
.sub { color: #666; margin-top: 0; }
.verdict { background: #f3f6fb; border-left: 4px solid #1f5fbf; padding: 0.6em 1em; }
.verdict p { margin: 0.35em 0; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #d8d8d8; padding: 0.25em 0.6em; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
tr.stage td { background: #fff4e0; }
tr.collapse td { background: #fde8e8; }
td.text { max-width: 22em; white-space: pre-wrap; word-break: break-word; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.tables { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.note { color: #8a5300; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def escape(value: object) -> str:
    return _escape(str(value), quote=True)


def fmt(value: object) -> str:
    """A table cell: counts with separators, floats to four significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    return str(value)


@dataclass
class Image:
    """A figure of the report: the PNG file written beside the page, and its inline copy."""

    file: str
    png: bytes
    alt: str
    caption: str

    def html(self) -> str:
        data = base64.b64encode(self.png).decode("ascii")
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{escape(self.alt)}" '
            f'data-file="{escape(self.file)}">'
            f"<figcaption>{escape(self.caption)} ({escape(self.file)})</figcaption></figure>"
        )


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    caption: str | None = None,
    row_classes: Sequence[str] | None = None,
    table_id: str | None = None,
) -> str:
    """An HTML table; numbers are right-aligned, everything else escaped text."""
    out = [f'<table id="{escape(table_id)}">' if table_id else "<table>"]
    if caption:
        out.append(f"<caption>{escape(caption)}</caption>")
    out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>")
    for i, row in enumerate(rows):
        klass = row_classes[i] if row_classes and row_classes[i] else ""
        out.append(f'<tr class="{klass}">' if klass else "<tr>")
        for cell in row:
            numeric = isinstance(cell, int | float) and not isinstance(cell, bool)
            css = "num" if numeric else "text"
            out.append(f'<td class="{css}">{escape(fmt(cell))}</td>')
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>{body}</section>'


def paragraph(text: str, css: str | None = None) -> str:
    return f'<p class="{css}">{escape(text)}</p>' if css else f"<p>{escape(text)}</p>"


# ----- sections ------------------------------------------------------------------------------


def header(run: Run, sentences: Sequence[str]) -> str:
    model = run.model or "unknown model"
    sub = f"run {run.name or run.path.name} · {run.sweep.kind} sweep · canfast report"
    verdict = "".join(paragraph(s) for s in sentences)
    return (
        f"<h1>canfast: {escape(model)}</h1><p class='sub'>{escape(sub)}</p>"
        f'<div class="verdict" id="verdict">{verdict}</div>'
    )


def navigation(anchors: Sequence[tuple[str, str]]) -> str:
    links = "".join(f'<a href="#{escape(a)}">{escape(t)}</a>' for a, t in anchors)
    return f"<nav>{links}</nav>"


def collapse_section(run: Run, image: Image | None) -> str:
    sweep = run.sweep
    parts = [image.html()] if image else []
    parts.append(
        paragraph(
            f"PPL_0 = {fmt(sweep.ppl0)} (unmasked). Collapse: log10(PPL_k / PPL_0) >= tau = "
            f"{fmt(sweep.tau)}; k1: the first k with PPL_k / PPL_0 >= "
            f"{fmt(sweep.onset)} (onset); k*: the first collapsing k."
        )
    )
    summary = [["CAN", sweep.k1, sweep.k_star, sweep.curve.largest_k]]
    for seed in sweep.random:
        summary.append([f"random seed {seed.seed}", seed.k1, seed.k_star, seed.largest_k])
    if sweep.random:
        summary.append(["random median", None, sweep.random_k_star, None])
    parts.append(table(["ordering", "k1", "k*", "largest k tried"], summary, table_id="stages"))
    curve = sweep.curve
    if curve.k:
        ratios, logs = curve.ratio(sweep.ppl0), curve.log10_ratio(sweep.ppl0)
        rows, classes = [], []
        for k, ppl, ratio, log in zip(curve.k, curve.ppl, ratios, logs):
            stage = ""
            if k == sweep.k1:
                stage = "onset (k1)"
            if k == sweep.k_star:
                stage = "collapse (k*)" if not stage else "onset and collapse"
            rows.append([k, ppl, ratio, log, stage])
            classes.append("collapse" if "collapse" in stage else "stage" if stage else "")
        parts.append("<h3>CAN curve</h3>")
        parts.append(
            table(["k", "PPL", "PPL / PPL_0", "log10 ratio", "stage"], rows, None, classes, "curve")
        )
    return section("collapse", "Collapse curve", "".join(parts))


def _count_rows(counts: Sequence[Count]) -> list[list[object]]:
    return [[c.group, c.count, c.total, _percent(c.share)] for c in counts]


def _percent(share: float | None) -> str | None:
    if share is None:
        return None
    return f"{100 * share:.3g}%"


def placement_section(run: Run, place: Placement | None, images: Sequence[Image]) -> str:
    if place is None or not place.neurons:
        return section("placement", "Where the top-k sit", paragraph("No ranking to show.", "note"))
    if run.k_star is not None:
        why = f"k = k* = {place.k}, the neurons whose masking collapses the model."
    else:
        why = f"k = {place.k}: the run never collapsed, so these are simply the top {place.k}."
    parts = [paragraph(why)]
    parts += [image.html() for image in images]
    headers = ["group", "top-k neurons", "neurons in group", "share of group"]
    parts.append('<div class="tables">')
    parts.append(table(headers, _count_rows(place.by_component), "per component", None, "by-comp"))
    parts.append(table(headers, _count_rows(place.by_kind), "per kind", None, "by-kind"))
    parts.append(table(headers, _count_rows(place.by_layer), "per layer", None, "by-layer"))
    if place.by_expert:
        parts.append(table(headers, _count_rows(place.by_expert), "per expert", None, "by-expert"))
    parts.append("</div>")
    stats = run.scores.stats if run.scores is not None else {}
    rows = []
    for rank, (site, channel, score) in enumerate(place.neurons, 1):
        extra = stats.get(site, {})
        rows.append(
            [rank, f"{site}:{channel}", score]
            + [float(extra[s][channel]) if s in extra else None for s in ("std", "act", "grad")]
        )
    parts.append("<h3>Top neurons</h3>")
    parts.append(
        table(
            ["rank", "neuron", "CAN score", "std over samples", "mean |a|", "mean |dL/da|"],
            rows,
            None,
            None,
            "top-neurons",
        )
    )
    return section("placement", f"Where the top {place.k} neurons sit", "".join(parts))


def heat_section(images: Sequence[Image], rank_image: Image | None) -> str:
    parts = [
        paragraph(
            "Rows are sites in model order, columns channels; colour is log10 of the CAN score "
            "(the largest in each bin where sites are wider than the plot). Crosses mark the "
            "top-k neurons; grey is padding where a site has fewer channels."
        )
    ]
    parts += [image.html() for image in images]
    if rank_image is not None:
        parts.append(rank_image.html())
    return section("heatmaps", "Scores across the model", "".join(parts))


BY_COLUMNS = ("group", "n_neurons", "k1", "k_star", "random_k_star", "ppl0")
BY_HEADERS = ("group", "neurons", "k1", "k*", "random median k*", "PPL_0")


def by_section(by: dict) -> str:
    """The sweep repeated per component, kind or data category, one table each."""
    parts = []
    for name, rows in by.items():
        if not isinstance(rows, list) or not rows:
            continue
        extra = sorted({k for r in rows if isinstance(r, dict) for k in r} - set(BY_COLUMNS))
        headers = [*BY_HEADERS, "random / CAN", *extra]
        body = []
        for row in rows:
            if not isinstance(row, dict):
                continue
            k_star, random = row.get("k_star"), row.get("random_k_star")
            factor = times(random / k_star) if k_star and random else None
            body.append([row.get(c) for c in BY_COLUMNS] + [factor] + [row.get(e) for e in extra])
        parts.append(f"<h3>by {escape(name)}</h3>")
        parts.append(table(headers, body, None, None, f"by-{name}"))
    return section("by", "Collapse per group", "".join(parts))


STAGES = ("base", "onset", "collapse")


def generations_section(run: Run) -> str:
    records = run.generations
    stage_k: dict[str, object] = {}
    by_sample: dict[object, dict] = {}
    for record in records:
        stage = record.get("stage")
        sample = by_sample.setdefault(record.get("sample"), {})
        sample.setdefault("prompt", record.get("prompt"))
        sample.setdefault("target", record.get("target"))
        sample[stage] = record.get("answer")
        stage_k.setdefault(stage, record.get("k"))
    headers = ["sample", "prompt", "target"]
    for stage, name in zip(STAGES, ("base", "onset (k1)", "collapse (k*)")):
        k = stage_k.get(stage)
        headers.append(f"{name}, k={fmt(k)}" if k is not None else f"{name}: not reached")
    rows = []
    for sample, values in by_sample.items():
        rows.append(
            [sample, values.get("prompt") or "", values.get("target") or ""]
            + [values.get(s, "") for s in STAGES]
        )
    intro = paragraph("Greedy answers of the same samples, unmasked and at the two stages.")
    return section("generations", "Generations", intro + table(headers, rows, None, None, "gens"))


# What the parameter table shows of a sweep's ``info`` by name; other plain values follow it.
SHOWN_INFO = {"model", "model_fingerprint", "sites", "n_samples", "targets", "masked_evaluations"}


def parameters_section(run: Run) -> str:
    sweep, meta, info = run.sweep, run.meta, run.sweep.info
    ks = sweep.curve.k
    sites = info.get("sites") or (run.scores.sites if run.scores is not None else [])
    fingerprint = info.get("model_fingerprint") or meta.get("model_fingerprint")
    rows: list[list[object]] = [
        ["model", run.model],
        ["model fingerprint", fingerprint],
        ["data fingerprint", meta.get("data_fingerprint")],
        ["sweep kind", sweep.kind],
        ["metric", sweep.metric],
        ["collapse rule", COLLAPSE_RULE],
        ["tau", sweep.tau],
        ["onset ratio", sweep.onset],
        ["alpha", meta.get("alpha")],
        ["unit", meta.get("unit")],
        ["targets", info.get("targets") or meta.get("targets")],
        ["objective", meta.get("objective")],
        ["samples", info.get("n_samples") or meta.get("n_samples")],
        ["neurons in the selected sites", sweep.n_neurons],
        ["sites", f"{len(sites)}: {', '.join(sites)}" if sites else None],
        ["k grid", f"{len(ks)} values, {ks[0]} to {ks[-1]}" if ks else None],
        ["random seeds", len(sweep.random)],
        ["masked evaluations", info.get("masked_evaluations")],
        ["scoring time (s)", _number(meta.get("seconds"))],
        ["canfast version (scores)", meta.get("canfast_version")],
        ["canfast version (report)", __version__],
    ]
    for name, seconds in sweep.timings.items():
        rows.append([f"time: {name}", seconds])
    for key in sorted(set(info) - SHOWN_INFO):
        value = info[key]
        if isinstance(value, str | int | float | bool) or value is None:
            rows.append([key, value])
    parts = []
    scored_on = meta.get("model_fingerprint")
    swept_on = info.get("model_fingerprint")
    if scored_on and swept_on and scored_on != swept_on:
        parts.append(
            paragraph(
                f"Warning: the scores were computed on model fingerprint {scored_on}, the sweep "
                f"ran on {swept_on}.",
                "note",
            )
        )
    parts.append(table(["parameter", "value"], rows, None, None, "parameter-table"))
    return section("parameters", "Parameters and fingerprints", "".join(parts))


def _number(text: str | None) -> float | str | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return text


def notes_section(notes: Sequence[str]) -> str:
    return section("notes", "Notes", "".join(paragraph(n, "note") for n in notes))


def document(title: str, body: Sequence[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
