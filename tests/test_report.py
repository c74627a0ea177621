"""The HTML report: built from a synthetic run directory written with the real ``SweepResult``
and ``Scores`` classes, parsed back with the standard library's HTML parser, and checked for
its figures, its tables, the run's numbers, escaping, and a verdict that follows the numbers."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from canfast.errors import BadInput
from canfast.io import write_json, write_jsonl
from canfast.report import REPORT, verdict, write_report
from canfast.score import Scores
from canfast.sweep.result import Curve, SweepResult

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODEL = "tiny <llava> & co"
PROMPT = '<image>\nIs 2 < 3 & "x" > y?'
ANSWER_BASE = "a red circle"
ANSWER_COLLAPSE = "<s><s> circle circle"
SITES = {
    "vision.0.up": 48,
    "vision.0.down": 16,
    "projector.0.up": 32,
    "language.0.gate": 64,
    "language.0.up": 64,
    "language.0.down": 16,
    "language.1.gate": 64,
    "language.1.up": 64,
    "language.1.down": 16,
}
N_NEURONS = sum(SITES.values())
PPL0 = 12.5
BY = {
    "component": [
        {"group": "language", "n_neurons": 288, "k1": 3, "k_star": 6, "random_k_star": 200.0,
         "ppl0": PPL0},
        {"group": "vision", "n_neurons": 64, "k1": None, "k_star": None, "random_k_star": None,
         "ppl0": PPL0},
    ],
    "category": [
        {"group": "count<&>colour", "n_neurons": 384, "k1": 2, "k_star": 4, "random_k_star": 150.5,
         "ppl0": 11.0},
    ],
}  # fmt: skip


def _curve(ks: list[int], ratios: list[float], onset: float, tau: float, seed=None) -> Curve:
    curve = Curve(seed=seed)
    for k, ratio in zip(ks, ratios):
        curve.add(k, PPL0 * ratio)
    curve.k1 = next((k for k, r in zip(ks, ratios) if r >= onset), None)
    curve.k_star = next((k for k, r in zip(ks, ratios) if math.log10(r) >= tau), None)
    return curve


def _scores() -> Scores:
    gen = torch.Generator().manual_seed(0)
    values, stats = {}, {}
    for name, channels in SITES.items():
        values[name] = torch.rand(channels, generator=gen) * 1e-3
        stats[name] = {s: torch.rand(channels, generator=gen) for s in ("std", "act", "grad")}
    # A handful of dominant neurons in the last language block, as CAN finds in real models.
    values["language.1.down"][[3, 7, 11]] = torch.tensor([0.9, 0.8, 0.7])
    values["language.1.gate"][[5, 60]] = torch.tensor([0.6, 0.5])
    meta = {
        "alpha": "0.5",
        "unit": "out",
        "targets": "self",
        "model": MODEL,
        "model_fingerprint": "f1ng3rpr1nt0001",
        "data_fingerprint": "d4t4f1ng3rpr1nt",
        "n_samples": "24",
        "objective": "mean_nll",
        "canfast_version": "0.1.0",
        "seconds": "1.250",
    }
    return Scores(values, stats, meta)


def _sweep(ratios: list[float], random_collapse: bool = True, by: bool = True) -> SweepResult:
    """CAN curve with the given ratios at k = 1..len; random seeds collapse near 2,300."""
    tau, onset = 1.0, 1.5
    ks = list(range(1, len(ratios) + 1))
    curve = _curve(ks, ratios, onset, tau)
    grid = [1, 10, 100, 1000, 2000, 2300, 2600, 3000]
    random = []
    for seed, at in enumerate([2000, 2300, 2600]):
        seed_ratios = [1.0 + 0.01 * k / 100 for k in grid]
        if random_collapse:
            seed_ratios = [20.0 if k >= at else r for k, r in zip(grid, seed_ratios)]
        random.append(_curve(grid, seed_ratios, onset, tau, seed=seed))
    result = SweepResult(
        "progressive", "ppl", tau, onset, N_NEURONS, PPL0, curve, random,
        timings={"base_s": 0.5, "progressive_s": 2.0, "random_s": 9.0},
    )  # fmt: skip
    result.info = {
        "model": MODEL,
        "model_fingerprint": "f1ng3rpr1nt0001",
        "sites": list(SITES),
        "n_samples": 24,
        "targets": "self",
        "masked_evaluations": 41,
    }
    if by:
        result.info["by"] = BY
    return result


def _generations(result: SweepResult) -> list[dict]:
    stages = [("base", 0, ANSWER_BASE), ("onset", result.k1, "a red red circle")]
    stages.append(("collapse", result.k_star, ANSWER_COLLAPSE))
    return [
        {"sample": i, "stage": stage, "k": k, "prompt": PROMPT if i == 0 else f"prompt {i}",
         "target": "a red circle", "answer": answer}
        for stage, k, answer in stages
        if k is not None
        for i in range(2)
    ]  # fmt: skip


TWO_STAGE = [1.0, 1.6, 1.9, 2.5, 12.0, 30.0, 60.0, 80.0]  # k1 = 2, k* = 5
ONE_STAGE = [1.0, 1.1, 1.2, 1.3, 15.0, 30.0]  # onset and collapse together at k = 5
NO_COLLAPSE = [1.0, 1.1, 1.3, 1.7, 2.0, 2.2]  # onset at 4, never collapses


def _run_dir(path: Path, result: SweepResult, with_scores: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if with_scores:
        scores = _scores()
        scores.save(path / "scores.safetensors")
        write_json(path / "neurons.json", scores.ranking().to_records())
    write_json(path / "sweep.json", result.to_json())
    write_jsonl(path / "generations.jsonl", _generations(result))
    return path


class Page(HTMLParser):
    """The parts of a report a reader looks at: images, tables by id, the verdict's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[dict[str, str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.sections: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.verdict = ""
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self._in_verdict = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(attrs)
        elif tag in ("a", "link", "script"):
            self.links.append(attrs.get("href") or attrs.get("src") or "")
        elif tag == "section":
            self.sections.append(attrs.get("id", ""))
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id") or f"t{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "div" and attrs.get("id") == "verdict":
            self._in_verdict = 1
        elif tag == "div" and self._in_verdict:
            self._in_verdict += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "div" and self._in_verdict:
            self._in_verdict -= 1

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_verdict:
            self.verdict += data


def _parse(path: Path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


def _column(rows: list[list[str]], header: str) -> list[str]:
    where = rows[0].index(header)
    return [row[where] for row in rows[1:]]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str, Page]:
    run = _run_dir(tmp_path_factory.mktemp("run"), _sweep(TWO_STAGE))
    path = write_report(run)
    text, page = _parse(path)
    return path, text, page


def test_every_figure_is_inlined_and_written_beside_the_page(full_report) -> None:
    path, _, page = full_report
    assert path.name == REPORT and path.parent.is_dir()
    files = {img["data-file"] for img in page.images}
    assert {"collapse.png", "placement.png", "score_rank.png"} <= files
    assert {"heatmap_vision.png", "heatmap_projector.png", "heatmap_language.png"} <= files
    assert files == {p.name for p in path.parent.glob("*.png")}
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        inline = base64.b64decode(img["src"][len(prefix) :], validate=True)
        on_disk = (path.parent / img["data-file"]).read_bytes()
        assert inline == on_disk and on_disk.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(on_disk)) as picture:
            picture.verify()
        assert img.get("alt")


def test_page_is_self_contained(full_report) -> None:
    _, text, page = full_report
    assert "script" not in page.tags and "link" not in page.tags
    assert all(link.startswith("#") for link in page.links)
    assert "http://" not in text and "https://" not in text


def test_tables_carry_the_runs_numbers(full_report) -> None:
    _, text, page = full_report
    stages = page.tables["stages"]
    can = next(row for row in stages if row[0] == "CAN")
    assert can[1:3] == ["2", "5"]
    median = next(row for row in stages if row[0] == "random median")
    assert median[2] == "2,300"
    assert [row[0] for row in stages].count("random seed 1") == 1

    curve = page.tables["curve"]
    assert _column(curve, "k") == [str(k) for k in range(1, len(TWO_STAGE) + 1)]
    assert _column(curve, "stage")[1] == "onset (k1)"
    assert _column(curve, "stage")[4] == "collapse (k*)"
    assert "PPL_0 = 12.5 (unmasked)" in text

    # k* = 5: the five planted neurons, all in language, three in language.1.down.
    top = page.tables["top-neurons"]
    assert _column(top, "neuron") == [
        "language.1.down:3",
        "language.1.down:7",
        "language.1.down:11",
        "language.1.gate:5",
        "language.1.gate:60",
    ]
    components = dict(row[:2] for row in page.tables["by-comp"][1:])
    assert components == {"vision": "0", "projector": "0", "language": "5"}
    kinds = dict(row[:2] for row in page.tables["by-kind"][1:])
    assert kinds["down"] == "3" and kinds["gate"] == "2" and kinds["up"] == "0"
    layers = dict(row[:2] for row in page.tables["by-layer"][1:])
    assert layers["language.1"] == "5" and layers["language.0"] == "0"

    params = dict(row[:2] for row in page.tables["parameter-table"][1:])
    assert params["model"] == MODEL
    assert params["model fingerprint"] == "f1ng3rpr1nt0001"
    assert params["data fingerprint"] == "d4t4f1ng3rpr1nt"
    assert params["alpha"] == "0.5" and params["unit"] == "out" and params["targets"] == "self"
    assert params["tau"] == "1" and params["onset ratio"] == "1.5"
    assert params["samples"] == "24" and params["canfast version (scores)"] == "0.1.0"
    assert params["time: random_s"] == "9"


def test_by_tables_are_rendered(full_report) -> None:
    _, _, page = full_report
    component = page.tables["by-component"]
    assert component[0][:6] == ["group", "neurons", "k1", "k*", "random median k*", "PPL_0"]
    language = next(row for row in component if row[0] == "language")
    assert language[1:6] == ["288", "3", "6", "200", "12.5"]
    assert "33.3x" in language
    vision = next(row for row in component if row[0] == "vision")
    assert vision[3] == "-"
    category = page.tables["by-category"]
    assert category[1][0] == "count<&>colour" and category[1][4] == "150.5"


def test_generations_side_by_side_and_escaped(full_report) -> None:
    _, text, page = full_report
    gens = page.tables["gens"]
    assert gens[0][3:] == ["base, k=0", "onset (k1), k=2", "collapse (k*), k=5"]
    first = gens[1]
    assert first[1] == PROMPT
    assert first[3] == ANSWER_BASE and first[5] == ANSWER_COLLAPSE
    # The raw page holds no markup from the data, only its escaped form.
    assert "<image>" not in text and "&lt;image&gt;" in text
    assert "<s>" not in text and "<llava>" not in text
    assert "Is 2 &lt; 3 &amp; &quot;x&quot; &gt; y?" in text


def test_verdict_two_stage_and_random_factor(full_report) -> None:
    _, _, page = full_report
    said = page.verdict
    assert "CAN collapses the model at k*=5" in said
    assert "two-stage collapse is visible" in said and "k1=2" in said
    assert "need 2,300" in said and "460x more" in said and "3 seeds" in said


def test_verdict_follows_the_numbers(tmp_path) -> None:
    one_stage = write_report(_run_dir(tmp_path / "one", _sweep(ONE_STAGE), with_scores=False))
    said = _parse(one_stage)[1].verdict
    assert "No two-stage collapse" in said and "k=5" in said
    assert "two-stage collapse is visible" not in said

    none = _sweep(NO_COLLAPSE, random_collapse=False, by=False)
    no_collapse = write_report(_run_dir(tmp_path / "none", none, with_scores=False))
    text, page = _parse(no_collapse)
    said = page.verdict
    assert said.startswith("No collapse") and "k=6" in said
    assert "Only the first stage" in said and "k1=4" in said
    assert "Random sets did not collapse within k <= 3,000 (0 of 3 seeds)" in said
    assert "collapse (k*): not reached" in page.tables["gens"][0]
    assert "by" not in page.sections and "heatmaps" not in page.sections
    assert "scores.safetensors is not in this run directory" in text


def test_verdict_sentences_directly() -> None:
    sweep = _sweep(TWO_STAGE, random_collapse=False)
    assert any("more than 600x smaller" in s for s in verdict(sweep))
    sweep.random = []
    assert any("No random baseline" in s for s in verdict(sweep))
    barely = _sweep([1.0, 1.0, 1.6, 12.0])
    assert any("barely separated" in s for s in verdict(barely))


def test_random_only_sweep_and_overflowing_perplexity(tmp_path) -> None:
    result = _sweep([1.0, 2.0, math.inf], by=False)
    run = _run_dir(tmp_path / "inf", result, with_scores=False)
    assert json.loads((run / "sweep.json").read_text())["ppl"][-1] == math.inf
    _, page = _parse(write_report(run))
    assert _column(page.tables["curve"], "PPL")[-1] == "inf"
    assert "k*=3" in page.verdict and "infinite" in page.verdict

    random_only = _sweep([], by=False)
    random_only.kind = "random"
    run = _run_dir(tmp_path / "random", random_only, with_scores=False)
    _, page = _parse(write_report(run))
    assert "random-only sweep" in page.verdict and "curve" not in page.tables
    assert page.tables["stages"][1] == ["CAN", "-", "-", "-"]


def test_not_a_run_directory(tmp_path) -> None:
    with pytest.raises(BadInput, match="sweep.json"):
        write_report(tmp_path)
    with pytest.raises(BadInput, match="not found"):
        write_report(tmp_path / "missing")
    (tmp_path / "sweep.json").write_text("{not json")
    with pytest.raises(BadInput, match="malformed"):
        write_report(tmp_path)


def test_degenerate_scores_and_nan_perplexity(tmp_path) -> None:
    result = _sweep([1.0, math.nan, 1.2], by=False)
    run = _run_dir(tmp_path / "zero", result)
    scores = Scores.load(run / "scores.safetensors")
    scores.values = {name: torch.zeros_like(t) for name, t in scores.values.items()}
    scores.save(run / "scores.safetensors")
    (run / "neurons.json").unlink()
    (run / "generations.jsonl").unlink()
    _, page = _parse(write_report(run))
    assert _column(page.tables["curve"], "PPL")[1] == "nan"
    assert len(page.tables["top-neurons"]) == 1 + 16
    assert "generations" not in page.sections and "heatmaps" in page.sections


def test_rewriting_drops_figures_the_run_no_longer_has(tmp_path) -> None:
    run = _run_dir(tmp_path / "again", _sweep(TWO_STAGE, by=False))
    write_report(run)
    assert (run / "heatmap_vision.png").is_file()
    (run / "scores.safetensors").unlink()
    _, page = _parse(write_report(run))
    assert not list(run.glob("heatmap_*.png")) and not (run / "score_rank.png").exists()
    assert {img["data-file"] for img in page.images} == {p.name for p in run.glob("*.png")}
