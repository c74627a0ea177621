"""The ``canfast`` command line: parse, call the API, print. No logic of its own.

Each option group below builds one config object of :mod:`canfast.pipeline`; each command takes
its groups, calls the API and prints what came back.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from canfast import __version__
from canfast.pipeline import (
    DEFAULT_DATA,
    DEFAULT_MODEL,
    DataConfig,
    ModelConfig,
    ScoreConfig,
    SiteConfig,
)
from canfast.sweep import GROUPINGS, METRICS, SweepConfig, find_strategy, strategy_names
from canfast.tables import table


def _fail(message: str) -> None:
    click.echo(f"canfast: error: {message}", err=True)
    sys.exit(2)


def _split(values: tuple[str, ...]) -> list[str]:
    """Repeated and comma-separated values, as one list."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


# ----- shared option groups ------------------------------------------------------------------


class OptionGroup:
    """Click options that together build one config object: decorate a command with the group,
    then ``group.take(params)`` removes the group's values from ``params`` and builds it."""

    def __init__(self, build: Callable[..., Any], *options: tuple[tuple[str, ...], dict]):
        self.build = build
        self.options = options
        self.names = [click.Option(list(decls), **attrs).name for decls, attrs in options]

    def __call__(self, f: Callable) -> Callable:
        for decls, attrs in reversed(self.options):
            f = click.option(*decls, **attrs)(f)
        return f

    def take(self, params: dict[str, Any]) -> Any:
        return self.build(**{name: params.pop(name) for name in self.names})


def option(*decls: str, **attrs: Any) -> tuple[tuple[str, ...], dict]:
    return decls, attrs


MODEL = OptionGroup(
    lambda **o: ModelConfig(**o, quiet=True),
    option(
        "--model",
        "-m",
        "name",
        default=DEFAULT_MODEL,
        show_default=True,
        help="Hub id, local directory, or builtin:NAME.",
    ),
    option("--dtype", default=None, help="float32, bfloat16 or float16 (default: as saved)."),
    option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)."),
    option("--device-map", default=None, help="Passed to transformers, e.g. auto."),
    option("--trust-remote-code", is_flag=True, help="Run the model repository's own code."),
    option(
        "--sites-map",
        "ffn_map",
        type=click.Path(dir_okay=False),
        default=None,
        help="JSON map of the FFN blocks of a family canfast has no rule for (README).",
    ),
    option(
        "--prompt-template",
        default=None,
        help="Prompt text around {prompt}, instead of the model's chat template.",
    ),
    option(
        "--chat-template/--no-chat-template",
        default=True,
        help="Write prompts with the model's own chat template when it has one (default).",
    ),
    option(
        "--task",
        type=click.Choice(["auto", "base"]),
        default="auto",
        show_default=True,
        help="auto: the model with the head it is scored with (refused when the checkpoint "
        "lacks the head's weights); base: the bare model, for a custom objective.",
    ),
    option(
        "--allow-pickle",
        is_flag=True,
        help="Read pickle weights (pytorch_model.bin) with torch's weights-only loader.",
    ),
)
SITES = OptionGroup(
    lambda unit, patterns, components, kinds: SiteConfig(
        unit, _split(patterns), _split(components), _split(kinds)
    ),
    option(
        "--unit",
        type=click.Choice(["out", "mid"]),
        default="out",
        show_default=True,
        help="out: output channels of each FFN Linear; mid: FFN intermediate neurons.",
    ),
    option(
        "--sites",
        "patterns",
        multiple=True,
        help="Glob(s) on site names, e.g. 'language.*.down'. Comma-separated or repeated.",
    ),
    option(
        "--component", "components", multiple=True, help="vision, projector, qformer, language."
    ),
    option("--kind", "kinds", multiple=True, help="gate, up, down (mid for --unit mid)."),
)
DATA = OptionGroup(
    DataConfig,
    option(
        "--data",
        "-d",
        "source",
        default=DEFAULT_DATA,
        show_default=True,
        help="builtin:NAME, a .jsonl file, or an image folder (with --prompt).",
    ),
    option("--prompt", default=None, help="The prompt for every image of an image folder."),
    option(
        "--limit", type=click.IntRange(min=1), default=None, help="Use only the first N samples."
    ),
    option(
        "--targets",
        type=click.Choice(["self", "given"]),
        default="self",
        show_default=True,
        help="self: the unmasked model's greedy answers; given: the data's targets.",
    ),
    option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True),
    option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
    option(
        "--score-eos/--no-score-eos",
        default=True,
        show_default=True,
        help="Append the end-of-sequence token to every target and score it.",
    ),
)
SCORING = OptionGroup(
    ScoreConfig,
    option(
        "--alpha",
        type=float,
        default=0.5,
        show_default=True,
        help="Exponent of |dL/da| in the CAN score, in [0, 1].",
    ),
    option(
        "--backend",
        type=click.Choice(["auto", "torch", "cpp", "triton"]),
        default="auto",
        show_default=True,
        help="Kernel backend for scoring and masking.",
    ),
)
SWEEP = OptionGroup(
    SweepConfig,
    option(
        "--sweep-kind",
        "kind",
        type=click.Choice(strategy_names()),
        default="progressive",
        show_default=True,
        help="; ".join(f"{n}: {find_strategy(n).description}" for n in strategy_names()) + ".",
    ),
    option(
        "--schedule",
        default=None,
        help="k values, e.g. 1,2,4,8 or 1:64 (default: 1..16, then x1.25 steps).",
    ),
    option(
        "--tau",
        type=float,
        default=1.0,
        show_default=True,
        help="Collapse threshold: log10(PPL_k / PPL_0) >= tau (ratio), or a mean loss risen by "
        "tau (delta).",
    ),
    option(
        "--criterion",
        type=click.Choice(["ratio", "delta"]),
        default="ratio",
        show_default=True,
        help="ratio: the perplexity ratio (for the NLL); delta: the absolute rise of the mean "
        "loss (for losses that are not an NLL).",
    ),
    option(
        "--onset",
        type=float,
        default=1.5,
        show_default=True,
        help="Degradation onset when PPL_k / PPL_0 >= onset.",
    ),
    option(
        "--seeds",
        type=click.IntRange(min=0),
        default=3,
        show_default=True,
        help="Random-baseline seeds.",
    ),
    option("--metric", type=click.Choice(METRICS), default="ppl", show_default=True),
    option(
        "--masks-per-pass",
        type=click.IntRange(min=1),
        default=4,
        show_default=True,
        help="Neuron sets evaluated in one forward pass.",
    ),
    option(
        "--generations",
        type=int,
        default=4,
        show_default=True,
        help="Samples whose answers are generated at k = 0, k1 and k*.",
    ),
    option(
        "--by",
        multiple=True,
        type=click.Choice(GROUPINGS),
        help="Also sweep each component, kind or data category on its own. Repeatable.",
    ),
    option(
        "--verify-top",
        type=click.IntRange(min=1),
        default=None,
        help="single: ablate exactly only the top N by the screen, plus a calibration sample.",
    ),
    option(
        "--calibrate",
        type=click.IntRange(min=0),
        default=None,
        help="single: random neurons also ablated exactly (default 2%, at least 64).",
    ),
    option(
        "--screen",
        type=click.Choice(["estimate", "can", "both"]),
        default="estimate",
        show_default=True,
        help="single: rank for --verify-top by |first-order estimate|, CAN, or both in turn.",
    ),
    option(
        "--search",
        is_flag=True,
        help="Find k1 and k* by galloping (k = 1, 2, 4, ...) and bisection instead of the whole "
        "curve: far fewer evaluations, assuming the metric rises with k (checked).",
    ),
    option(
        "--max-batch-tokens",
        type=click.IntRange(min=1),
        default=None,
        help="single: tokens per ablation block (blocks halve on out-of-memory). Default: 65536 "
        "on a GPU; on the CPU, as many as keep a block's widest FFN activation within 24 MiB.",
    ),
)
OUTPUT = OptionGroup(
    dict,
    option(
        "--out",
        "-o",
        type=click.Path(path_type=Path),
        default=None,
        help="Run directory (default: runs/COMMAND-MODEL-TIME).",
    ),
    option("--overwrite", is_flag=True, help="Replace the files of an existing run directory."),
)
AS_JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


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
@MODEL
@SITES
@AS_JSON
def sites(as_json, **params):
    """Print the map of a model's FFN sites: component, layer, kind, channels, totals."""
    from canfast.pipeline import component_totals, site_records

    model = MODEL.take(params).load()
    selection = SITES.take(params)
    chosen = selection.select(model)
    records = site_records(chosen)
    if as_json:
        shown = {"model": model.name, "unit": selection.unit, "sites": records}
        click.echo(json.dumps(shown, indent=2))
        return
    headers = ["site", "component", "layer", "kind", "channels", "module"]
    click.echo(table(headers, [[r[h] for h in headers] for r in records]))
    click.echo("")
    click.echo(table(["component", "sites", "neurons"], component_totals(chosen)))


@main_group.command()
@MODEL
@DATA
@SITES
@SCORING
@OUTPUT
@click.option("--top", type=int, default=10, show_default=True, help="Neurons shown.")
@AS_JSON
def score(top, as_json, **params):
    """Compute CAN scores; write scores.safetensors and neurons.json into the run directory."""
    from canfast.pipeline import run

    done = run(
        MODEL.take(params),
        DATA.take(params),
        SITES.take(params),
        SCORING.take(params),
        **OUTPUT.take(params),
    )
    best = done.scores.ranking()[:top].to_records()
    if as_json:
        click.echo(
            json.dumps({"out": str(done.out), "meta": done.scores.meta, "top": best}, indent=2)
        )
        return
    rows = [[i + 1, r["neuron"], r["score"]] for i, r in enumerate(best)]
    click.echo(table(["rank", "neuron", "score"], rows))
    _say_ties(done.scores.ranking(), top)
    click.echo(f"\nwrote {done.out}/scores.safetensors and {done.out}/neurons.json")
    _exit_if_failed(done)


def _say_ties(ranking, shown: int | None) -> None:
    from canfast.io import describe_ties

    line = describe_ties(ranking, shown)
    if line:
        click.echo(line)


def _exit_if_failed(done) -> None:
    """A step after the main result failed: the result is in the run, and the exit says so."""
    if done.failed:
        click.echo(f"canfast: {done.failed}; the rest of the run is in {done.out}", err=True)
        sys.exit(1)


@main_group.command()
@MODEL
@DATA
@SITES
@SCORING
@click.option(
    "--scores",
    "scores_path",
    type=click.Path(path_type=Path),
    default=None,
    help="scores.safetensors (or its run directory), narrowed to the selected sites; scored "
    "first when absent.",
)
@SWEEP
@OUTPUT
@click.option(
    "--resume",
    is_flag=True,
    help="Go on with the interrupted run in --out (same command): finished work is kept.",
)
@AS_JSON
def sweep(scores_path, resume, as_json, **params):
    """Mask the top-k CAN neurons progressively until the model collapses.

    Writes scores.safetensors and neurons.json (those of --scores, narrowed to the selected
    sites), the strategy's files (sweep.json and generations.jsonl for progressive and random)
    and report.html, and prints the collapse curve with k1 (onset) and k* (collapse) beside the
    random baseline.
    """
    from dataclasses import replace

    from canfast.pipeline import run

    scoring = replace(SCORING.take(params), path=scores_path)
    done = run(
        MODEL.take(params),
        DATA.take(params),
        SITES.take(params),
        scoring,
        SWEEP.take(params),
        **OUTPUT.take(params),
        resume=resume,
    )
    if not done.leader:
        return  # rank 0 of the torchrun job prints
    if as_json:
        click.echo(json.dumps({"out": str(done.out), **done.result.summary_json()}))
        return
    if done.resumed:
        click.echo(f"resumed: {done.resumed} finished chunks were read back, not computed")
    click.echo(done.result.summary(done.scores.ranking()))
    _say_ties(done.scores.ranking(), getattr(done.result, "k_star", None))
    click.echo(f"\nwrote {done.out}")
    _exit_if_failed(done)


@main_group.command()
@MODEL
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
@AS_JSON
def generate(neurons, k, neuron_ids, image, prompt, data, limit, max_new_tokens, as_json, **params):
    """Print the base and the masked answers side by side."""
    from canfast.data import Sample, load_data, open_image
    from canfast.errors import BadInput
    from canfast.pipeline import compare_generations, top_neuron_ids
    from canfast.sites import NeuronSet

    if image is not None and prompt is None:
        raise BadInput(f"--image {image} needs --prompt")
    picture = open_image(image, "--image") if image is not None else None
    ids = _split(neuron_ids) + (top_neuron_ids(neurons, k) if neurons is not None else [])
    neuron_set = NeuronSet.from_ids(ids)
    model = MODEL.take(params).load()
    if prompt is not None:
        samples = [Sample(picture, prompt)]
    else:
        samples = load_data(data or DEFAULT_DATA, limit=limit)
    records = compare_generations(model, samples, neuron_set, max_new_tokens)
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    click.echo(f"masking {len(neuron_set)} neurons")
    rows = [[r["prompt"], r["base"], r["masked"]] for r in records]
    click.echo(table(["prompt", "base", f"masked (k={len(neuron_set)})"], rows))


@main_group.command()
@click.argument("run", type=click.Path(path_type=Path))
def report(run):
    """Write report.html (and its PNGs) for a run directory."""
    from canfast.pipeline import write_report

    click.echo(f"wrote {write_report(run)}")


# click >= 8.2 raises this for a bare ``canfast``; older versions print the help themselves.
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line each, like errors."""
    click.echo(f"canfast: warning: {str(message).splitlines()[0]}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input exits 2 with one line on stderr, never a traceback."""
    import warnings

    from canfast.allocator import keep_freed_memory
    from canfast.errors import BadInput
    from canfast.pipeline import Interrupted

    warnings.showwarning = _show_warning
    keep_freed_memory()  # the command owns its process (see canfast.allocator)
    try:
        main_group.main(args=argv, prog_name="canfast", standalone_mode=False)
    except BadInput as exc:
        _fail(str(exc))
    except Interrupted as exc:
        click.echo(f"canfast: {exc}", err=True)
        sys.exit(exc.code)
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
