"""The ``canfast`` command line: parse, call the API, print. No logic of its own."""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import click

from canfast import __version__

DEFAULT_MODEL = "builtin:tiny-llava"
DEFAULT_DATA = "builtin:shapes"


def _fail(message: str) -> None:
    click.echo(f"canfast: error: {message}", err=True)
    sys.exit(2)


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # The first column is text and reads best left-aligned; numbers line up on the right.
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}"
    return str(value)


def _split(values: tuple[str, ...]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


# ----- shared options ------------------------------------------------------------------------


def model_options(f):
    options = [
        click.option(
            "--model",
            "-m",
            default=DEFAULT_MODEL,
            show_default=True,
            help="Hub id, local directory, or builtin:NAME.",
        ),
        click.option(
            "--dtype", default=None, help="float32, bfloat16 or float16 (default: as saved)."
        ),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)."),
        click.option("--device-map", default=None, help="Passed to transformers, e.g. auto."),
        click.option(
            "--trust-remote-code", is_flag=True, help="Run the model repository's own code."
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def site_options(f):
    options = [
        click.option(
            "--unit",
            type=click.Choice(["out", "mid"]),
            default="out",
            show_default=True,
            help="out: output channels of each FFN Linear; mid: FFN intermediate neurons.",
        ),
        click.option(
            "--sites",
            "site_globs",
            multiple=True,
            help="Glob(s) on site names, e.g. 'language.*.down'. Comma-separated or repeated.",
        ),
        click.option("--component", multiple=True, help="vision, projector, qformer, language."),
        click.option(
            "--kind", "site_kinds", multiple=True, help="gate, up, down (mid for --unit mid)."
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def data_options(f):
    options = [
        click.option(
            "--data",
            "-d",
            default=DEFAULT_DATA,
            show_default=True,
            help="builtin:NAME, a .jsonl file, or an image folder (with --prompt).",
        ),
        click.option(
            "--prompt", default=None, help="The prompt for every image of an image folder."
        ),
        click.option(
            "--limit",
            type=click.IntRange(min=1),
            default=None,
            help="Use only the first N samples.",
        ),
        click.option(
            "--targets",
            type=click.Choice(["self", "given"]),
            default="self",
            show_default=True,
            help="self: the unmasked model's greedy answers; given: the data's targets.",
        ),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
        click.option(
            "--backend",
            type=click.Choice(["auto", "torch", "cpp", "triton"]),
            default="auto",
            show_default=True,
            help="Kernel backend for scoring and masking.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load_model(model, dtype, device, device_map, trust_remote_code):
    from canfast.model import load, quiet_transformers

    quiet_transformers()
    if not sys.stderr.isatty():
        # A pipe or a log gets plain lines: a bad-input error stays the only line on stderr.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return load(
        model,
        dtype=dtype,
        device=device,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
    )


def _load_samples(data, prompt, limit):
    from canfast.data import load_data

    return load_data(data, prompt=prompt, limit=limit)


def _default_out(command: str, model: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", model.split(":")[-1].split("/")[-1]).strip("-")
    return Path("runs") / f"{command}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


# ----- commands ------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version=__version__, prog_name="canfast")
def main_group():
    """Find the few feed-forward neurons a model cannot live without.

    canfast scores every FFN neuron by activation magnitude times gradient sensitivity (CAN),
    masks the top-k progressively until the model collapses, and compares with random sets.
    Every command runs on the built-in model and data when --model and --data are not given.
    """


@main_group.command()
@model_options
@site_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def sites(
    model,
    dtype,
    device,
    device_map,
    trust_remote_code,
    unit,
    site_globs,
    component,
    site_kinds,
    as_json,
):
    """Print the map of a model's FFN sites: component, layer, kind, channels, totals."""
    m = _load_model(model, dtype, device, device_map, trust_remote_code)
    chosen = m.sites(unit, _split(site_globs), _split(component), _split(site_kinds))
    if as_json:
        records = [
            {
                "site": s.name,
                "component": s.component,
                "layer": s.layer,
                "kind": s.kind,
                "channels": s.channels,
                "module": s.module_path,
            }
            for s in chosen
        ]
        click.echo(json.dumps({"model": m.name, "unit": unit, "sites": records}, indent=2))
        return
    rows = [[s.name, s.component, s.layer, s.kind, s.channels, s.module_path] for s in chosen]
    click.echo(_table(["site", "component", "layer", "kind", "channels", "module"], rows))
    totals: dict[str, list[int]] = {}
    for s in chosen:
        totals.setdefault(s.component, [0, 0])
        totals[s.component][0] += 1
        totals[s.component][1] += s.channels
    click.echo("")
    rows = [[c, n, ch] for c, (n, ch) in totals.items()]
    rows.append(["total", sum(r[1] for r in rows), sum(r[2] for r in rows)])
    click.echo(_table(["component", "sites", "neurons"], rows))


@main_group.command()
@model_options
@data_options
@site_options
@click.option(
    "--alpha",
    type=float,
    default=0.5,
    show_default=True,
    help="Exponent of |dL/da| in the CAN score, in [0, 1].",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory (default: runs/score-MODEL-TIME).",
)
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing run directory.")
@click.option(
    "--top", type=int, default=10, show_default=True, help="Neurons shown in the summary."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of a table.")
def score(
    model,
    dtype,
    device,
    device_map,
    trust_remote_code,
    data,
    prompt,
    limit,
    targets,
    max_new_tokens,
    batch_size,
    backend,
    unit,
    site_globs,
    component,
    site_kinds,
    alpha,
    out,
    overwrite,
    top,
    as_json,
):
    """Compute CAN scores; write scores.safetensors and neurons.json into the run directory."""
    from canfast.io import prepare_run_dir, write_json
    from canfast.score import check_alpha
    from canfast.score import score as run_score

    check_alpha(alpha)
    out = out or _default_out("score", model)
    _check_out(out, overwrite)
    samples = _load_samples(data, prompt, limit)
    m = _load_model(model, dtype, device, device_map, trust_remote_code)
    chosen = m.sites(unit, _split(site_globs), _split(component), _split(site_kinds))
    scores = run_score(
        m,
        samples,
        alpha=alpha,
        unit=unit,
        sites=[s.name for s in chosen],
        targets=targets,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        backend=backend,
    )
    out = prepare_run_dir(out, overwrite)
    scores.save(out / "scores.safetensors")
    ranking = scores.ranking()
    write_json(out / "neurons.json", ranking.to_records())
    best = ranking[:top].to_records()
    if as_json:
        click.echo(json.dumps({"out": str(out), "meta": scores.meta, "top": best}, indent=2))
        return
    click.echo(
        _table(
            ["rank", "neuron", "score"],
            [[i + 1, r["neuron"], r["score"]] for i, r in enumerate(best)],
        )
    )
    click.echo(f"\nwrote {out}/scores.safetensors and {out}/neurons.json")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing run directory before any work, so nothing is half-written."""
    from canfast.errors import BadInput

    if out.exists() and not out.is_dir():
        raise BadInput(f"output {out} exists and is not a directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BadInput(f"output directory {out} already exists; pass --overwrite to replace it")


def _read_scores(path: Path):
    from canfast.score import Scores

    path = Path(path)
    return Scores.load(path / "scores.safetensors" if path.is_dir() else path)


@main_group.command()
@model_options
@data_options
@site_options
@click.option(
    "--scores",
    "scores_path",
    type=click.Path(path_type=Path),
    default=None,
    help="scores.safetensors (or its run directory); scored first when absent.",
)
@click.option(
    "--alpha", type=float, default=0.5, show_default=True, help="CAN exponent, when scoring first."
)
@click.option(
    "--sweep-kind",
    "sweep_kind",
    type=click.Choice(["progressive", "random"]),
    default="progressive",
    show_default=True,
)
@click.option(
    "--schedule",
    default=None,
    help="k values, e.g. 1,2,4,8 or 1:64 (default: 1..16, then x1.25 steps).",
)
@click.option(
    "--tau",
    type=float,
    default=1.0,
    show_default=True,
    help="Collapse when log10(PPL_k / PPL_0) >= tau.",
)
@click.option(
    "--onset",
    type=float,
    default=1.5,
    show_default=True,
    help="Degradation onset when PPL_k / PPL_0 >= onset.",
)
@click.option("--seeds", type=int, default=3, show_default=True, help="Random-baseline seeds.")
@click.option("--metric", type=click.Choice(["ppl", "gen-ppl"]), default="ppl", show_default=True)
@click.option(
    "--masks-per-pass",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Neuron sets evaluated in one forward pass.",
)
@click.option(
    "--generations",
    type=int,
    default=4,
    show_default=True,
    help="Samples whose answers are generated at k = 0, k1 and k*.",
)
@click.option(
    "--by",
    multiple=True,
    type=click.Choice(["component", "kind", "category"]),
    help="Also sweep each component, kind or data category on its own. Repeatable.",
)
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory (default: runs/sweep-MODEL-TIME).",
)
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing run directory.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of a table.")
def sweep(
    model,
    dtype,
    device,
    device_map,
    trust_remote_code,
    data,
    prompt,
    limit,
    targets,
    max_new_tokens,
    batch_size,
    backend,
    unit,
    site_globs,
    component,
    site_kinds,
    scores_path,
    alpha,
    sweep_kind,
    schedule,
    tau,
    onset,
    seeds,
    metric,
    masks_per_pass,
    generations,
    by,
    out,
    overwrite,
    as_json,
):
    """Mask the top-k CAN neurons progressively until the model collapses.

    Writes scores.safetensors and neurons.json (when it scores), sweep.json and
    generations.jsonl, and prints the collapse curve with k1 (onset) and k* (collapse) beside
    the random baseline.
    """
    from canfast.io import prepare_run_dir, write_json, write_jsonl
    from canfast.score import check_alpha
    from canfast.score import score as run_score
    from canfast.sweep import sweep as run_sweep
    from canfast.sweep.schedule import parse_schedule

    check_alpha(alpha)
    out = out or _default_out("sweep", model)
    _check_out(out, overwrite)
    samples = _load_samples(data, prompt, limit)
    m = _load_model(model, dtype, device, device_map, trust_remote_code)
    chosen = m.sites(unit, _split(site_globs), _split(component), _split(site_kinds))
    scores = None
    if scores_path is not None:
        scores = _read_scores(scores_path)
        scores.check_model(m, source=f"scores {scores_path}")
    n_neurons = sum(s.channels for s in chosen)
    ks = parse_schedule(schedule, n_neurons) if schedule else None

    from canfast.objective import with_targets

    samples = with_targets(m, samples, targets, max_new_tokens, batch_size)
    if scores is None:
        scores = run_score(
            m,
            samples,
            alpha=alpha,
            unit=unit,
            sites=[s.name for s in chosen],
            targets="given",
            batch_size=batch_size,
            backend=backend,
        )
        scores.meta["targets"] = targets
    options = dict(
        kind=sweep_kind,
        schedule=ks,
        tau=tau,
        onset=onset,
        seeds=seeds,
        metric=metric,
        batch_size=batch_size,
        masks_per_pass=masks_per_pass,
        max_new_tokens=max_new_tokens,
        backend=backend,
    )
    result = run_sweep(m, samples, scores, targets="given", generations=generations, **options)
    result.info["targets"] = targets
    if by:
        from canfast.sweep.groups import sweep_by

        result.info["by"] = {b: sweep_by(b, m, samples, scores, **options) for b in by}
    out = prepare_run_dir(out, overwrite)
    if scores_path is None:
        scores.save(out / "scores.safetensors")
        write_json(out / "neurons.json", scores.ranking().to_records())
    write_json(out / "sweep.json", result.to_json())
    write_jsonl(out / "generations.jsonl", result.generations)
    _write_report(out)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "out": str(out),
                    "k_star": result.k_star,
                    "k1": result.k1,
                    "random_k_star": result.random_k_star,
                    "ppl0": result.ppl0,
                }
            )
        )
        return
    click.echo(_sweep_summary(result, scores))
    for grouping, rows in result.info.get("by", {}).items():
        click.echo("")
        click.echo(
            _table(
                [grouping, "neurons", "samples", "ppl0", "k1", "k*", "random k*"],
                [
                    [
                        r["group"],
                        r["n_neurons"],
                        r["n_samples"],
                        r["ppl0"],
                        r["k1"],
                        r["k_star"],
                        r["random_k_star"],
                    ]
                    for r in rows
                ],
            )
        )
    click.echo(f"\nwrote {out}")


def _write_report(out: Path) -> None:
    try:
        from canfast.report import write_report
    except ImportError:
        return
    write_report(out)


def _sweep_summary(result, scores) -> str:
    ratio = dict(zip(result.curve.k, result.curve.ratio(result.ppl0), strict=False))
    rows = []
    for k in result.curve.k:
        stage = "collapse (k*)" if k == result.k_star else "onset (k1)" if k == result.k1 else ""
        rows.append([k, ratio[k] * result.ppl0, ratio[k], math.log10(max(ratio[k], 1e-300)), stage])
    lines = [
        f"PPL_0 = {result.ppl0:.4g} over {result.info.get('n_samples')} samples, "
        f"{result.n_neurons} neurons in {len(result.info.get('sites', []))} sites"
    ]
    if rows:
        lines.append(_table(["k", "ppl", "ratio", "log10 ratio", "stage"], rows))
    lines.append("")
    seeds = [[c.seed, c.k1, c.k_star] for c in result.random]
    summary = [["CAN", result.k1, result.k_star]] + [
        [f"random seed {s}", a, b] for s, a, b in seeds
    ]
    summary.append(["random median", result.random_k1, result.random_k_star])
    lines.append(_table(["ordering", "k1", "k*"], summary))
    if result.k_star is not None:
        lines.append("")
        lines.append("top neurons: " + ", ".join(scores.ranking()[: min(result.k_star, 8)].ids()))
    return "\n".join(lines)


@main_group.command()
@model_options
@click.option(
    "--neurons",
    type=click.Path(path_type=Path),
    default=None,
    help="neurons.json of a run (or the run directory).",
)
@click.option(
    "--k",
    "k",
    type=click.IntRange(min=1),
    default=None,
    help="Mask the top k neurons of --neurons.",
)
@click.option(
    "--neuron", "neuron_ids", multiple=True, help="Neuron ids to mask, e.g. language.3.down:17."
)
@click.option("--image", type=click.Path(path_type=Path), default=None)
@click.option("--prompt", default=None)
@click.option("--data", "-d", default=None, help="Use the samples of this data instead.")
@click.option("--limit", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def generate(
    model,
    dtype,
    device,
    device_map,
    trust_remote_code,
    neurons,
    k,
    neuron_ids,
    image,
    prompt,
    data,
    limit,
    max_new_tokens,
    as_json,
):
    """Print the base and the masked answers side by side."""
    from canfast import generate as run_generate
    from canfast.data import Sample, load_data, open_image
    from canfast.errors import BadInput
    from canfast.io import read_json
    from canfast.sites import NeuronSet

    if image is not None and prompt is None:
        raise BadInput(f"--image {image} needs --prompt")
    picture = open_image(image, "--image") if image is not None else None
    chosen = list(_split(neuron_ids))
    if neurons is not None:
        path = neurons / "neurons.json" if neurons.is_dir() else neurons
        records = read_json(path)
        if not isinstance(records, list) or not all(
            isinstance(r, dict) and "neuron" in r for r in records
        ):
            raise BadInput(f"{path}: expected a list of {{'neuron': ...}} records")
        if k is None:
            raise BadInput("--neurons needs --k, the number of top neurons to mask")
        chosen += [r["neuron"] for r in records[:k]]
    neuron_set = NeuronSet.from_ids(chosen)
    m = _load_model(model, dtype, device, device_map, trust_remote_code)
    if prompt is not None:
        samples = [Sample(picture, prompt)]
    else:
        samples = load_data(data or DEFAULT_DATA, limit=limit)
    for site_name, _ in neuron_set:
        m.site(site_name)
    base = run_generate(m, samples, max_new_tokens=max_new_tokens)
    masked = run_generate(m, samples, neuron_set, max_new_tokens=max_new_tokens)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {"prompt": s.prompt, "base": b, "masked": a}
                    for s, b, a in zip(samples, base, masked, strict=False)
                ],
                indent=2,
            )
        )
        return
    click.echo(f"masking {len(neuron_set)} neurons")
    click.echo(
        _table(
            ["prompt", "base", f"masked (k={len(neuron_set)})"],
            [[s.prompt, b, a] for s, b, a in zip(samples, base, masked, strict=False)],
        )
    )


@main_group.command()
@click.argument("run", type=click.Path(path_type=Path))
def report(run):
    """Write report.html (and its PNGs) for a run directory."""
    from canfast.errors import BadInput

    if not (run / "sweep.json").is_file():
        raise BadInput(f"{run}: no sweep.json in this run directory")
    try:
        from canfast.report import write_report
    except ImportError:
        raise BadInput("the report module is not available in this installation") from None
    path = write_report(run)
    click.echo(f"wrote {path}")


# click >= 8.2 raises this for a bare ``canfast``; older versions print the help themselves.
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


@main_group.command()
@click.option("--quick", is_flag=True, help="Small shapes: a smoke run of every benchmark.")
@click.option(
    "--only",
    type=click.Choice(["kernels", "score"]),
    default=None,
    help="Run one benchmark: the kernels, or canfast.score end to end.",
)
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    default=Path("."),
    show_default=True,
    help="The canfast checkout whose bench/ folder to run.",
)
def bench(quick, only, root):
    """Run the benchmarks of a canfast checkout (bench/*.py): tables on stdout, JSON in
    bench/results/. The benchmarks measure ratios within one run, never absolute targets."""
    import runpy

    from canfast.errors import BadInput

    scripts = {
        "kernels": root / "bench" / "kernels.py",
        "score": root / "bench" / "score_end_to_end.py",
    }
    chosen = [only] if only else list(scripts)
    missing = [str(scripts[c]) for c in chosen if not scripts[c].is_file()]
    if missing:
        raise BadInput(
            f"benchmark not found: {missing[0]} (run from a canfast checkout or pass --root)"
        )
    for name in chosen:
        click.echo(f"== {name} ==")
        saved = sys.argv
        sys.argv = [str(scripts[name])] + (["--quick"] if quick else [])
        try:
            runpy.run_path(str(scripts[name]), run_name="__main__")
        finally:
            sys.argv = saved


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input exits 2 with one line on stderr, never a traceback."""
    from canfast.errors import BadInput

    try:
        main_group.main(args=argv, prog_name="canfast", standalone_mode=False)
    except BadInput as exc:
        _fail(str(exc))
    except _NO_ARGS as exc:
        exc.show()
        sys.exit(2)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C into Abort (from the KeyboardInterrupt): still an interrupt.
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            click.echo("canfast: interrupted", err=True)
            sys.exit(130)
        click.echo("canfast: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        _fail(exc.format_message().replace("\n", " "))
    except KeyboardInterrupt:
        click.echo("canfast: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
