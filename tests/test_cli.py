"""The command line, run as users run it: the real entry point in a subprocess, offline, on a
tiny LLaVA built from configs.

The rule under test: bad input gets one line on stderr, ``canfast: error: ...`` naming the input,
and exit code 2; never a traceback, and never a half-written run directory. Each command's happy
path runs once, on three samples and a handful of k.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from canfast.cli import main, main_group

PROMPT = "what colour is the shape ?"
WORDS = (
    "<pad> <s> </s> <unk> USER: ASSISTANT: what colour is the shape ? red blue green "
    "circle square a ."
).split()
COLOURS = ("red", "blue", "green")
# Enough to exercise every stage, small enough to run in seconds on a shared CPU.
FAST = ["--limit", "3", "--max-new-tokens", "4", "--batch-size", "2"]
SWEEP_FAST = [*FAST, "--seeds", "1", "--schedule", "1:4", "--generations", "1"]


# ----- helpers -------------------------------------------------------------------------------


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m canfast.cli ARGS`` on the installed canfast (as a user runs it; the source
    tree has no built ``_C``), with the Hub offline."""
    env = dict(os.environ)
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home")}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "canfast.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def error_line(result: subprocess.CompletedProcess, *named: str) -> str:
    """The single ``canfast: error:`` line of a bad-input run, which must name ``named``."""
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stderr, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, shown
    line = lines[0]
    assert line.startswith("canfast: error: ") and line.removeprefix("canfast: error: ").strip()
    for name in named:
        assert name in line, f"{name!r} not named in: {line}"
    return line


def in_process(capsys, *args: str | Path) -> tuple[int, str, str]:
    """``canfast.cli.main(ARGS)`` in this process, for checks that need no model: (code, out,
    err)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----- a tiny LLaVA and a tiny data set ------------------------------------------------------


def build_tiny_llava(path: Path, seed: int) -> Path:
    """A random-weight LLaVA (CLIP vision tower, projector, Llama) with a word-level tokenizer
    and a PIL image processor, saved like a Hub checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AddedToken,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_image(path: Path, colour: str) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((6, 6, 26, 26), fill=colour)
    image.save(path)
    return path


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(image: str, target: str) -> str:
    return json.dumps({"image": image, "prompt": PROMPT, "target": target, "category": "colour"})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Working directory of every run: two tiny LLaVAs (A and B differ only in their random
    weights), three images and their JSONL, and an unsupported model (a ResNet config)."""
    from transformers import ResNetConfig

    root = tmp_path_factory.mktemp("cli")
    build_tiny_llava(root / "llava-a", seed=0)
    build_tiny_llava(root / "llava-b", seed=1)
    ResNetConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1]).save_pretrained(root / "resnet")
    data = root / "data"
    data.mkdir()
    for colour in COLOURS:
        write_image(data / f"{colour}.png", colour)
    write_jsonl(data / "shapes.jsonl", [record(f"{c}.png", c) for c in COLOURS])
    return root


@pytest.fixture(scope="module")
def score_run(work) -> tuple[Path, subprocess.CompletedProcess]:
    """``canfast score`` on model A: the run that the sweep and generate runs build on."""
    out = work / "score-a"
    result = run_cli(
        "score",
        "--model",
        work / "llava-a",
        "--data",
        work / "data/shapes.jsonl",
        *FAST,
        "--out",
        out,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    return out, result


# ----- bad input: one line, exit 2, nothing written ------------------------------------------


@pytest.mark.parametrize(
    "name, named",
    [
        ("no-such-org/no-such-model", ["no-such-org/no-such-model"]),
        ("./no-such-dir", ["no-such-dir", "not found"]),
    ],
    ids=["hub-id", "local-path"],
)
def test_wrong_model_name(work, name, named):
    out = work / "out-wrong-model"
    result = run_cli("score", "--model", name, "--out", out, cwd=work)
    error_line(result, *named)
    assert not out.exists()


def test_unsupported_architecture(work):
    out = work / "out-resnet"
    result = run_cli("score", "--model", work / "resnet", "--out", out, cwd=work)
    line = error_line(result, "resnet", "unsupported architecture")
    assert "llava" in line  # it says what is supported
    assert not out.exists()


def test_selector_that_matches_nothing(work):
    out = work / "out-selector"
    result = run_cli(
        "score",
        "--model",
        work / "llava-a",
        "--data",
        work / "data/shapes.jsonl",
        "--sites",
        "language.*.nothing",
        "--out",
        out,
        cwd=work,
    )
    error_line(result, "language.*.nothing", "matches no site")
    assert not out.exists()


def test_selector_combination_that_matches_nothing(work):
    # Each filter alone matches; together (vision blocks have no gate) they match nothing.
    result = run_cli(
        "sites", "--model", work / "llava-a", "--component", "vision", "--kind", "gate", cwd=work
    )
    error_line(result, "--component vision", "--kind gate")


def test_missing_image_in_jsonl_names_the_line_and_path(work):
    data = write_jsonl(
        work / "data/missing-image.jsonl", [record("red.png", "red"), record("nowhere.png", "x")]
    )
    out = work / "out-missing-image"
    result = run_cli("score", "--model", work / "llava-a", "--data", data, "--out", out, cwd=work)
    error_line(result, "missing-image.jsonl:2", "nowhere.png", "not found")
    assert not out.exists()


def test_malformed_jsonl_line_names_its_line_number(work):
    # A blank line in between: the number is the line of the file, not of the record.
    data = write_jsonl(
        work / "data/malformed.jsonl",
        [record("red.png", "red"), "", '{"image": "blue.png", "prompt": "what colour'],
    )
    out = work / "out-malformed"
    result = run_cli("sweep", "--model", work / "llava-a", "--data", data, "--out", out, cwd=work)
    error_line(result, "malformed.jsonl:3", "malformed JSON")
    assert not out.exists()


def test_score_file_from_another_model_is_refused(work, score_run):
    scores = score_run[0] / "scores.safetensors"
    out = work / "out-other-model"
    result = run_cli(
        "sweep",
        "--model",
        work / "llava-b",
        "--data",
        work / "data/shapes.jsonl",
        "--scores",
        scores,
        *SWEEP_FAST,
        "--out",
        out,
        cwd=work,
    )
    error_line(result, str(scores), "another model")
    assert not out.exists()


def test_alpha_out_of_range(work):
    out = work / "out-alpha"
    result = run_cli(
        "score",
        "--model",
        work / "llava-a",
        "--data",
        work / "data/shapes.jsonl",
        "--alpha",
        "1.5",
        "--out",
        out,
        cwd=work,
    )
    error_line(result, "alpha", "1.5", "[0, 1]")
    assert not out.exists()


def test_a_backend_that_cannot_run_the_model_is_refused(work, monkeypatch):
    """Refused in one line once the model is loaded, before any pass: the first product raised
    a traceback inside the forward pass."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton then runs on CUDA alone
    out = work / "triton-on-the-cpu"
    result = run_cli("score", "--backend", "triton", "--out", out, cwd=work)
    error_line(result, "--backend triton")
    assert not out.exists()


def test_existing_output_directory_is_refused_without_overwrite(work):
    out = work / "out-existing"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run\n")
    result = run_cli(
        "score",
        "--model",
        work / "llava-a",
        "--data",
        work / "data/shapes.jsonl",
        "--out",
        out,
        cwd=work,
    )
    error_line(result, str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "an earlier run\n"


# More bad input, in this process: each is refused before any model loads (loading one fails
# the test), so these are fast; the entry point and its error handling are the same.


def make_inputs(folder: Path) -> None:
    write_image(folder / "red.png", "red")
    (folder / "not-an-image.png").write_text("these are not pixels\n")
    (folder / "a-file").write_text("not a directory\n")
    (folder / "images").mkdir()
    write_image(folder / "images/blue.png", "blue")
    (folder / "run").mkdir()
    (folder / "run/neurons.json").write_text('[{"neuron": "language.0.down:1", "score": 1.0}]')
    (folder / "bad-neurons.json").write_text('{"neuron": "language.0.down:1"}')
    write_jsonl(folder / "no-prompt.jsonl", [record("red.png", "red"), '{"image": "red.png"}'])
    write_jsonl(folder / "image-number.jsonl", ['{"image": 3, "prompt": "what"}'])
    write_jsonl(folder / "unreadable.jsonl", [record("not-an-image.png", "red")])
    write_jsonl(folder / "empty.jsonl", ["", "  "])


BAD_ARGUMENTS = {
    "image-missing": (
        ["generate", "--image", "nowhere.png", "--prompt", PROMPT],
        ["nowhere.png", "not found"],
    ),
    "image-unreadable": (
        ["generate", "--image", "not-an-image.png", "--prompt", PROMPT],
        ["not-an-image.png", "cannot read"],
    ),
    "image-without-prompt": (["generate", "--image", "red.png"], ["red.png", "--prompt"]),
    "neurons-missing": (["generate", "--neurons", "nowhere.json", "--k", "2"], ["nowhere.json"]),
    "neurons-not-a-list": (
        ["generate", "--neurons", "bad-neurons.json", "--k", "2"],
        ["bad-neurons.json"],
    ),
    "neurons-without-k": (["generate", "--neurons", "run"], ["--neurons", "--k"]),
    "k-zero": (["generate", "--neurons", "run", "--k", "0"], ["--k", "0"]),
    "neuron-id": (["generate", "--neuron", "language.0.down"], ["language.0.down", "SITE:CHANNEL"]),
    "alpha-negative": (["sweep", "--alpha", "-0.25"], ["alpha", "-0.25"]),
    "alpha-not-a-number": (["sweep", "--alpha", "half"], ["--alpha", "half"]),
    "batch-size-zero": (["score", "--batch-size", "0"], ["--batch-size", "0"]),
    "limit-zero": (["score", "--limit", "0"], ["--limit", "0"]),
    "unit": (["sites", "--unit", "neuron"], ["--unit", "neuron"]),
    "option": (["sites", "--no-such-option"], ["--no-such-option"]),
    "command": (["no-such-command"], ["no-such-command"]),
    "out-is-a-file": (
        ["score", "--out", "a-file", "--overwrite"],
        ["a-file", "not a directory"],
    ),
    "data-missing": (["score", "--data", "nowhere.jsonl"], ["nowhere.jsonl", "not found"]),
    "jsonl-no-prompt": (["score", "--data", "no-prompt.jsonl"], ["no-prompt.jsonl:2", '"prompt"']),
    "jsonl-image-not-a-string": (
        ["sweep", "--data", "image-number.jsonl"],
        ["image-number.jsonl:1", '"image"'],
    ),
    "jsonl-unreadable-image": (
        ["score", "--data", "unreadable.jsonl"],
        ["unreadable.jsonl:1", "not-an-image.png"],
    ),
    "jsonl-empty": (["score", "--data", "empty.jsonl"], ["empty.jsonl", "no samples"]),
    "folder-without-prompt": (["sweep", "--data", "images"], ["images", "--prompt"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_input_in_process(capsys, tmp_path, monkeypatch, case):
    import canfast.pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("bad input must be refused before the model loads")

    monkeypatch.setattr(canfast.pipeline.ModelConfig, "load", no_model)
    monkeypatch.chdir(tmp_path)
    make_inputs(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    args, named = BAD_ARGUMENTS[case]
    code, _, err = in_process(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("canfast: error: "), err
    for name in named:
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    # Nothing written: no run directory, no file touched.
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_report_needs_a_sweep(capsys, tmp_path):
    code, _, err = in_process(capsys, "report", tmp_path)
    assert code == 2
    wanted = f"canfast: error: {tmp_path}: no sweep.json or scan.json in this run directory"
    assert err.strip() == wanted


# ----- happy paths -----------------------------------------------------------------------------


def test_the_documented_commands_exist():
    assert {"sites", "score", "sweep", "generate", "report"} <= set(main_group.commands)


@pytest.mark.parametrize("command", [None, *sorted(main_group.commands)])
def test_help_of_every_command(capsys, command):
    args = [command, "--help"] if command else ["--help"]
    code, out, err = in_process(capsys, *args)
    assert code == 0, err
    assert out.startswith(f"Usage: canfast {command or ''}".rstrip())
    assert err == ""


def test_version(capsys):
    import canfast

    code, out, err = in_process(capsys, "--version")
    assert code == 0, err
    assert canfast.__version__ in out


def test_no_command_shows_the_usage(capsys):
    code, out, err = in_process(capsys)
    assert code == 2
    assert "Usage: canfast" in out + err
    assert "canfast: error" not in err


def test_sites_table(work):
    result = run_cli("sites", "--model", work / "llava-a", cwd=work)
    assert result.returncode == 0, result.stderr
    site_table, totals = result.stdout.strip().split("\n\n")
    names = [line.split()[0] for line in site_table.splitlines()[2:]]
    assert "language.0.gate" in names and "vision.1.down" in names
    assert "projector.0.up" in names
    assert len(names) == 12  # 2 CLIP layers x (up, down) + projector x 2 + 2 Llama x 3
    rows = {line.split()[0]: line.split()[1:] for line in totals.splitlines()[2:]}
    assert set(rows) == {"vision", "projector", "language", "total"}
    assert rows["vision"] == ["4", str(2 * (64 + 32))]
    assert rows["projector"] == ["2", "64"]
    assert rows["language"] == ["6", str(2 * (64 + 64 + 32))]
    assert rows["total"] == ["12", str(192 + 64 + 320)]


def test_sites_json(work):
    result = run_cli(
        "sites", "--model", work / "llava-a", "--json", "--component", "language", cwd=work
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["unit"] == "out"
    assert [s["site"] for s in report["sites"]] == [
        f"language.{layer}.{kind}" for layer in (0, 1) for kind in ("gate", "up", "down")
    ]
    first = report["sites"][0]
    assert first["channels"] == 64 and first["kind"] == "gate" and first["layer"] == 0
    assert first["module"].endswith("layers.0.mlp.gate_proj")


def test_score_writes_scores_and_ranking(score_run):
    from safetensors import safe_open

    from canfast.sites import parse_neuron

    out, result = score_run
    files = ["manifest.json", "neurons.json", "scores.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == files
    assert "Traceback" not in result.stderr
    assert f"wrote {out}/scores.safetensors" in result.stdout
    assert "rank" in result.stdout.splitlines()[0]

    with safe_open(str(out / "scores.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    assert float(meta["alpha"]) == 0.5 and meta["n_samples"] == "3"
    assert meta["model_fingerprint"] and meta["unit"] == "out"
    assert {"language.0.down", "vision.1.up", "projector.0.down"} <= keys

    ranking = json.loads((out / "neurons.json").read_text())
    assert len(ranking) == 192 + 64 + 320
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores, reverse=True)
    ids = [parse_neuron(r["neuron"]) for r in ranking]
    assert len(set(ids)) == len(ids)
    assert all(site in keys for site, _ in ids)


def sweep_with_scores(work: Path, scores: Path, *args: str | Path):
    """A fast ``canfast sweep`` of llava-a on the shapes data, with ``--scores``."""
    return run_cli(
        "sweep",
        "--model",
        work / "llava-a",
        "--data",
        work / "data/shapes.jsonl",
        "--scores",
        scores,
        *SWEEP_FAST,
        *args,
        cwd=work,
    )


def test_sweep_with_scores_overwrites_and_prints_json(work, score_run):
    out = work / "sweep-a"
    out.mkdir()
    (out / "sweep.json").write_text("stale\n")
    result = sweep_with_scores(work, score_run[0], "--out", out, "--overwrite", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["out"] == str(out)
    assert summary["ppl0"] > 0
    assert {"k_star", "k1", "random_k_star"} <= set(summary)

    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["k"] == [1, 2, 3, 4]
    assert len(sweep["ppl"]) == len(sweep["ratio"]) == 4
    assert all(p > 0 for p in sweep["ppl"])
    for got, ppl in zip(sweep["ratio"], sweep["ppl"], strict=True):
        assert got == pytest.approx(ppl / sweep["ppl0"])
    assert sweep["k_star"] == summary["k_star"] and sweep["k1"] == summary["k1"]
    assert sweep["k_star"] is None or sweep["k_star"] in sweep["k"]
    assert len(sweep["random"]["seeds"]) == 1
    assert sweep["random"]["seeds"][0]["k"] == [1, 2, 3, 4]

    generations = [
        json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()
    ]
    assert generations and all(isinstance(g, dict) for g in generations)
    # Scores came from --scores: the run holds them as read (every site was selected), and
    # the ranking they give.
    read = load_file(str(score_run[0] / "scores.safetensors"))
    kept = load_file(str(out / "scores.safetensors"))
    assert kept.keys() == read.keys()
    assert all(torch.equal(kept[name], read[name]) for name in read)
    ranked = (score_run[0] / "neurons.json").read_text()
    assert (out / "neurons.json").read_text() == ranked


def test_sweep_with_scores_masks_only_the_selected_sites(work, score_run):
    """A site selection narrows scores read with --scores: only the selected sites' neurons are
    ranked and masked, and the manifest names those sites. Scores of the other unit are
    refused."""
    sweep_from = functools.partial(sweep_with_scores, work, score_run[0])
    out = work / "sweep-language"
    result = sweep_from("--sites", "language.*", "--out", out)
    assert result.returncode == 0, result.stderr
    scored = load_file(str(score_run[0] / "scores.safetensors"))
    language = [name for name in scored if name.startswith("language.") and "@" not in name]
    assert language and len(language) < len([n for n in scored if "@" not in n])
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["n_neurons"] == sum(scored[name].numel() for name in language)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["run"]["selected_sites"]) == sorted(language)
    assert manifest["run"]["scoring"]["alpha"] is None  # the scores file holds its own
    # The run holds the ranking it masked: the scores read, narrowed, and their neurons.json.
    kept = load_file(str(out / "scores.safetensors"))
    assert sorted(n for n in kept if "@" not in n) == sorted(language)
    assert all(torch.equal(kept[name], scored[name]) for name in language)
    ranked = json.loads((out / "neurons.json").read_text())
    assert len(ranked) == sweep["n_neurons"]
    assert {r["neuron"].split(":")[0] for r in ranked} == set(language)
    page = (out / "report.html").read_text()
    # Named by the run's directory, not the staging directory it was drawn in.
    assert f"run {out.name} ·" in page and ".partial" not in page
    assert "is not in this run directory" not in page and "no placement" not in page

    out = work / "sweep-mid"
    error_line(sweep_from("--unit", "mid", "--out", out), "unit 'out'", "--unit out")
    assert not out.exists()


def test_generate_prints_base_and_masked_answers(work, score_run):
    image = work / "data/red.png"
    result = run_cli(
        "generate",
        "--model",
        work / "llava-a",
        "--neurons",
        score_run[0],
        "--k",
        "2",
        "--image",
        image,
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "4",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "masking 2 neurons"
    header = lines[1].split()
    assert header[:2] == ["prompt", "base"] and "masked" in lines[1] and "(k=2)" in lines[1]
    assert len(lines) == 4 and lines[3].startswith(PROMPT)


# ----- atomic writes -------------------------------------------------------------------------


def test_write_json_failure_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    from canfast import io

    path = tmp_path / "sweep.json"
    io.write_json(path, {"k": [1, 2]})
    before = path.read_bytes()

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        io.write_json(path, {"k": [1, 2, 3, 4]})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.json"]


def test_write_json_unserializable_keeps_the_old_file(tmp_path):
    from canfast import io

    path = tmp_path / "neurons.json"
    io.write_json(path, [{"neuron": "language.0.down:1", "score": 1.0}])
    before = path.read_bytes()
    with pytest.raises(TypeError):
        io.write_json(path, [{"neuron": object()}])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["neurons.json"]


def test_atomic_writes_replace_and_leave_no_temp(tmp_path):
    from canfast import io

    io.write_json(tmp_path / "a.json", {"v": 1})
    io.write_json(tmp_path / "a.json", {"v": 2})
    io.write_jsonl(tmp_path / "g.jsonl", [{"k": 0}, {"k": 1}])
    assert io.read_json(tmp_path / "a.json") == {"v": 2}
    lines = (tmp_path / "g.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"k": 0}, {"k": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "g.jsonl"]
