"""Sweeps: the k*/k1 search on metrics known in closed form, schedules, the random baseline,
the sweep.json form, and an end-to-end sweep of a tiny LLaVA checked against direct
evaluation."""

from __future__ import annotations

import json
import math

import pytest
import tiny_models as tm
import torch

import canfast
from canfast import BadInput, NeuronSet, SweepResult, masked
from canfast.io import read_json, write_json
from canfast.objective import evaluate
from canfast.sweep.baseline import random_ordering
from canfast.sweep.result import Curve
from canfast.sweep.schedule import default_schedule, parse_schedule
from canfast.sweep.trace import falls, search_plan, trace, trace_all

pytestmark = pytest.mark.usefixtures("one_thread")

PPL0 = 2.0
GRID = [1, 2, 4, 8, 16, 32, 64, 128, 256]
ORDERING = NeuronSet(tuple((f"language.{i % 3}.down", i) for i in range(300)))


class Stub:
    """An evaluator whose metric is a known function of k = len(set)."""

    def __init__(self, metric, masks_per_pass: int) -> None:
        self.metric = metric
        self.masks_per_pass = masks_per_pass
        self.seen: list[int] = []

    def __call__(self, sets):
        assert 1 <= len(sets) <= self.masks_per_pass
        for s in sets:
            # Always a prefix of the ordering: the cumulative top k.
            assert s.neurons == ORDERING.neurons[: len(s)]
        ks = [len(s) for s in sets]
        self.seen += ks
        return [self.metric(k) for k in ks]

    def groups(self, groups):
        return [self(g) for g in groups]


def exponential(rate: float):
    """ppl = ppl0 * 10 ** (k / rate): log10 of the ratio is k / rate."""
    return lambda k: PPL0 * 10 ** min(k / rate, 300.0)


def first_k(metric, reached, limit=10_000):
    return next((k for k in range(1, limit) if reached(metric(k) / PPL0)), None)


@pytest.mark.parametrize("masks_per_pass", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(
    ("rate", "tau", "onset", "k1", "k_star"),
    [
        # log10(1.5) * 47.3 = 8.33 -> k1 = 9; 47.3 -> k* = 48.
        (47.3, 1.0, 1.5, 9, 48),
        (47.3, 0.5, 1.5, 9, 24),
        (10.0, 2.0, 3.0, 5, 20),
        # Collapse at the very first k.
        (0.4, 1.0, 1.5, 1, 1),
        # Never collapses over the grid: k1 is found, k* is not.
        (700.0, 1.0, 1.5, 124, None),
    ],
)
def test_trace_finds_exact_stages(masks_per_pass, rate, tau, onset, k1, k_star):
    metric = exponential(rate)
    assert first_k(metric, lambda r: r >= onset) == k1
    if k_star is not None:
        assert first_k(metric, lambda r: math.log10(r) >= tau) == k_star
    stub = Stub(metric, masks_per_pass)
    curve = trace(stub, ORDERING, GRID, PPL0, tau, onset)
    assert (curve.k1, curve.k_star) == (k1, k_star)
    # The curve holds every evaluated k once, sorted, with its metric.
    assert curve.k == sorted(set(stub.seen))
    assert curve.ppl == [metric(k) for k in curve.k]
    # The stage boundaries are proven by evaluated neighbours.
    for found in (k1, k_star):
        if found is not None:
            assert found in curve.k
            assert found == 1 or found - 1 in curve.k
    # Grid points are evaluated in passes of masks_per_pass, stopping after the pass that
    # first collapses.
    grid_hit = next((k for k in GRID if k_star is not None and k >= k_star), None)
    if grid_hit is None:
        evaluated_grid = GRID
    else:
        stop = (GRID.index(grid_hit) // masks_per_pass + 1) * masks_per_pass
        evaluated_grid = GRID[:stop]
    assert [k for k in curve.k if k in GRID] == evaluated_grid


def test_trace_step_metric():
    """A metric that jumps at k = 37: both stages there, whatever the pass width."""

    def metric(k):
        return PPL0 if k < 37 else PPL0 * 100

    for masks_per_pass in (1, 3, 5):
        curve = trace(Stub(metric, masks_per_pass), ORDERING, GRID, PPL0, 1.0, 1.5)
        assert (curve.k1, curve.k_star) == (37, 37)
        assert 36 in curve.k


def test_trace_thresholds_are_inclusive():
    """A ratio of exactly the onset, and a log10 ratio of exactly tau, reach their stage."""

    def metric(k):
        return PPL0 * (1.0 if k < 7 else 1.5 if k < 20 else 10.0)

    curve = trace(Stub(metric, 2), ORDERING, GRID, PPL0, 1.0, 1.5)
    assert (curve.k1, curve.k_star) == (7, 20)


def test_trace_without_refinement():
    curve = trace(Stub(exponential(47.3), 2), ORDERING, GRID, PPL0, 1.0, 1.5, refine=False)
    assert (curve.k1, curve.k_star) == (16, 64)
    assert all(k in GRID for k in curve.k)


def search(metric, masks_per_pass: int, n: int = len(ORDERING), tau=1.0, onset=1.5):
    stub = Stub(metric, masks_per_pass)
    plan = search_plan(n, PPL0, tau, onset, masks_per_pass)
    return trace_all(stub, [ORDERING], [plan])[0], stub


@pytest.mark.parametrize("masks_per_pass", [1, 2, 4, 7])
@pytest.mark.parametrize("rate", [0.4, 3.0, 47.3, 80.0, 290.0])
def test_search_finds_the_exact_stages_with_few_evaluations(masks_per_pass, rate):
    metric = exponential(rate)
    curve, stub = search(metric, masks_per_pass)
    k1 = first_k(metric, lambda r: r >= 1.5, limit=len(ORDERING) + 1)
    k_star = first_k(metric, lambda r: math.log10(r) >= 1.0, limit=len(ORDERING) + 1)
    assert (curve.k1, curve.k_star) == (k1, k_star)
    assert curve.k == sorted(set(stub.seen))
    # Gallop (log2 of 300, about 9 points) and two bisections of a gap below a power of two.
    assert len(stub.seen) <= 2 * 9 + 2 * math.ceil(math.log2(len(ORDERING)))
    assert not falls(curve)


def test_search_ends_at_n_when_nothing_collapses():
    curve, stub = search(lambda k: PPL0 * (1 + k / 1000), 4)
    assert curve.k_star is None and max(stub.seen) == len(ORDERING)
    assert curve.k1 is None  # the ratio is 1.3 at n = 300: no onset either


def test_search_records_where_the_curve_falls():
    """A curve that collapses at 4, recovers from 6 to 40 and collapses again: the gallop's
    first pass (1, 2, 4, 8) sees it fall from 4 to 8, and the record says so."""

    def metric(k):
        return PPL0 * (100.0 if 4 <= k < 6 or k >= 40 else 1.0)

    curve, _ = search(metric, 4)
    dips = falls(curve)
    assert {"k_before": 5, "ppl_before": 200.0, "k": 6, "ppl": 2.0} in dips or any(
        d["k_before"] in (4, 5) for d in dips
    ), curve
    for dip in dips:
        assert dip["k_before"] < dip["k"] and dip["ppl"] < dip["ppl_before"]


def test_curve_add_keeps_order():
    curve = Curve()
    for k, p in ((8, 3.0), (2, 1.0), (5, 2.0), (16, 4.0)):
        curve.add(k, p)
    assert curve.k == [2, 5, 8, 16] and curve.ppl == [1.0, 2.0, 3.0, 4.0]
    assert curve.ratio(2.0) == [0.5, 1.0, 1.5, 2.0]


def test_default_schedule():
    assert default_schedule(0) == []
    assert default_schedule(1) == [1]
    assert default_schedule(10) == list(range(1, 11))
    assert default_schedule(16) == list(range(1, 17))
    expected = list(range(1, 17)) + [20, 25, 32, 40, 50, 63, 79, 99, 100]
    assert default_schedule(100) == expected
    big = default_schedule(4096 * 32)
    assert big[-1] == 4096 * 32
    assert all(b > a for a, b in zip(big, big[1:]))
    assert all(b <= math.ceil(a * 1.25) for a, b in zip(big[15:], big[16:]))
    assert len(big) < 80


def test_parse_schedule():
    assert parse_schedule("1,2,4,8", 100) == [1, 2, 4, 8]
    assert parse_schedule(" 8, 2,2 ,4 ", 100) == [2, 4, 8]
    assert parse_schedule("1:5", 100) == [1, 2, 3, 4, 5]
    assert parse_schedule("1:10:3", 100) == [1, 4, 7, 10]
    assert parse_schedule("0,1:3,50,200", 100) == [1, 2, 3, 50]


@pytest.mark.parametrize("text", ["a,b", "1:x", "1::2", "1:10:0", "2.5", "", "0,-1", "500"])
def test_parse_schedule_errors(text):
    with pytest.raises(BadInput, match="schedule"):
        parse_schedule(text, 100)


def test_random_ordering():
    pool = {"language.0.up": 7, "vision.1.down": 5, "projector.0.up": 3}
    every = sorted((site, c) for site, n in pool.items() for c in range(n))
    first = random_ordering(pool, 0)
    assert sorted(first) == every
    assert len(first) == len(every)
    assert random_ordering(pool, 0) == first
    others = [random_ordering(pool, seed) for seed in (1, 2, 3)]
    for other in others:
        assert sorted(other) == every
        assert other != first
    # Not just site after site: the sites mix within the first neurons.
    assert len({site for site, _ in list(first)[:6]}) > 1


def test_random_k_star_median():
    def result(stars):
        curves = [Curve(k_star=s) for s in stars]
        return SweepResult("progressive", "ppl", 1.0, 1.5, 10, 2.0, Curve(), curves)

    assert result([10, None, 30]).random_k_star == 30
    assert result([10, 20]).random_k_star == 15.0
    assert result([None, None, 5]).random_k_star is None
    assert result([]).random_k_star is None


def example_result() -> SweepResult:
    curve = Curve([1, 2, 4, 5, 8], [2.5, 3.0, 5.0, 25.0, 40.0], k1=2, k_star=5)
    random = [
        Curve([1, 8], [2.1, 2.4], None, None, seed=0),
        Curve([1, 8, 16], [2.0, 2.9, 30.0], 8, 16, seed=1),
    ]
    result = SweepResult(
        "progressive",
        "ppl",
        1.0,
        1.5,
        16,
        2.0,
        curve,
        random,
        {"base_s": 0.5, "progressive_s": 1.25},
        {"model": "tiny", "sites": ["language.0.up"], "n_samples": 3},
    )
    return result


def test_sweep_json_fields():
    data = example_result().to_json()
    assert data["kind"] == "progressive"
    assert data["criterion"]["metric"] == "ppl"
    assert data["criterion"]["tau"] == 1.0
    assert data["criterion"]["onset_ratio"] == 1.5
    assert data["k"] == [1, 2, 4, 5, 8]
    assert data["ppl"] == [2.5, 3.0, 5.0, 25.0, 40.0]
    assert data["ratio"] == [1.25, 1.5, 2.5, 12.5, 20.0]
    assert data["log10_ratio"] == pytest.approx([math.log10(r) for r in data["ratio"]])
    assert (data["k_star"], data["k1"]) == (5, 2)
    assert data["ppl0"] == 2.0 and data["n_neurons"] == 16
    assert [s["seed"] for s in data["random"]["seeds"]] == [0, 1]
    assert data["random"]["seeds"][1]["k_star"] == 16
    assert data["random"]["seeds"][1]["ratio"] == [1.0, 1.45, 15.0]
    # One seed never collapsed: it counts as beyond every k, so the median of two is unknown.
    assert data["random"]["k_star_median"] is None
    assert data["timings"] == {"base_s": 0.5, "progressive_s": 1.25}
    assert data["model"] == "tiny" and data["sites"] == ["language.0.up"]
    json.dumps(data, allow_nan=False)


def test_sweep_json_round_trip(tmp_path):
    result = example_result()
    data = result.to_json()
    again = SweepResult.from_json(json.loads(json.dumps(data)))
    assert again.to_json() == data
    for name in ("kind", "metric", "tau", "onset", "n_neurons", "ppl0", "timings", "info"):
        assert getattr(again, name) == getattr(result, name), name
    assert again.curve == result.curve
    assert again.random == result.random
    path = write_json(tmp_path / "sweep.json", data)
    assert SweepResult.from_json(read_json(path)).to_json() == data


# ----- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_run():
    """A tiny LLaVA trained to memorise three answers (perplexity near 1), its CAN scores, and
    a sweep with the default collapse threshold."""
    samples = tm.samples("llava", 3)
    model = tm.fit(tm.wrap("llava"), samples)
    scores = canfast.score(model, samples, targets="given", backend="torch", progress=False)
    result = canfast.sweep(
        model,
        samples,
        scores,
        schedule=[1, 4, 16, 64, 160, 1000],
        tau=1.0,
        seeds=1,
        targets="given",
        batch_size=2,
        masks_per_pass=3,
        generations=1,
        max_new_tokens=3,
        backend="torch",
        progress=False,
    )
    return model, samples, scores, result


def masked_ppl(model, samples, neurons):
    with masked(model, neurons, backend="torch"):
        return evaluate(model, samples, batch_size=3)[0].ppl


def check_stages(curve: Curve, ppl0: float, tau: float, onset: float) -> None:
    """k* and k1 are the smallest evaluated k of their stage, proven by k - 1."""
    ratio = dict(zip(curve.k, curve.ratio(ppl0)))
    for found, reached in (
        (curve.k_star, lambda r: math.log10(r) >= tau),
        (curve.k1, lambda r: r >= onset),
    ):
        if found is None:
            assert not any(reached(r) for r in ratio.values())
            continue
        assert reached(ratio[found])
        assert found == 1 or not reached(ratio[found - 1])
        assert not any(reached(r) for k, r in ratio.items() if k < found)


def test_sweep_end_to_end(llava_run, tmp_path):
    model, samples, scores, result = llava_run
    order = scores.ranking()
    n = sum(model.site(s).channels for s in scores.sites)
    assert n == 336 and result.n_neurons == n
    assert result.ppl0 == pytest.approx(evaluate(model, samples)[0].ppl, rel=1e-6)
    # The schedule was clipped to the number of neurons.
    assert max(result.curve.k) <= n
    assert result.ppl0 < 3
    # The model collapses, and both stages are consistent with the curve.
    assert result.k_star is not None and result.k1 is not None
    assert result.k1 <= result.k_star
    check_stages(result.curve, result.ppl0, result.tau, result.onset)
    # Each point of the curve is the perplexity with the top k masked, one mask at a time.
    for k, ppl in zip(result.curve.k, result.curve.ppl):
        assert ppl == pytest.approx(masked_ppl(model, samples, order[:k]), rel=1e-5), k
    # The random baseline: the seeded ordering of the same sites.
    assert len(result.random) == 1 and result.random[0].seed == 0
    shuffled = random_ordering({s: model.site(s).channels for s in scores.sites}, 0)
    base = result.random[0]
    check_stages(base, result.ppl0, result.tau, result.onset)
    for k, ppl in list(zip(base.k, base.ppl))[:3]:
        assert ppl == pytest.approx(masked_ppl(model, samples, shuffled[:k]), rel=1e-5), k

    data = result.to_json()
    for key in ("kind", "criterion", "k", "ppl", "ratio", "k_star", "k1", "random", "timings"):
        assert key in data, key
    assert data["ratio"] == pytest.approx([p / result.ppl0 for p in data["ppl"]])
    i = data["k"].index(data["k_star"])
    assert data["log10_ratio"][i] >= data["criterion"]["tau"]
    assert all(v < data["criterion"]["tau"] for v in data["log10_ratio"][:i])
    assert {"base_s", "curves_s"} <= data["timings"].keys()
    assert all(v >= 0 for v in data["timings"].values())
    assert data["sites"] == scores.sites and data["n_samples"] == 3
    path = write_json(tmp_path / "sweep.json", data)
    assert SweepResult.from_json(read_json(path)).to_json() == data

    stages = {(g["stage"], g["k"]) for g in result.generations}
    assert stages == {("base", 0), ("onset", result.k1), ("collapse", result.k_star)}
    assert all(g["sample"] == 0 for g in result.generations)
    for record in result.generations:
        neurons = order[: record["k"]]
        expected = canfast.generate(model, samples[:1], neurons, max_new_tokens=3)[0]
        assert record["answer"] == expected
        assert record["target"] == samples[0].target


def test_sweep_with_neuron_set_and_random_kind(llava_run):
    model, samples, scores, result = llava_run
    order = scores.ranking()
    again = canfast.sweep(
        model,
        samples,
        order,
        schedule=[1, 4, 16],
        tau=100.0,
        seeds=0,
        targets="given",
        masks_per_pass=1,
        generations=0,
        backend="torch",
        progress=False,
    )
    assert again.k_star is None and again.random == []
    common = [k for k in again.curve.k if k in result.curve.k]
    assert common
    for k in common:
        expected = result.curve.ppl[result.curve.k.index(k)]
        assert again.curve.ppl[again.curve.k.index(k)] == pytest.approx(expected, rel=1e-5)
    random_only = canfast.sweep(
        model,
        samples,
        scores,
        kind="random",
        schedule=[1, 4],
        seeds=2,
        tau=100.0,
        targets="given",
        generations=0,
        progress=False,
    )
    assert random_only.curve.k == [] and random_only.k_star is None
    assert [c.seed for c in random_only.random] == [0, 1]
    assert random_only.random[0].ppl != random_only.random[1].ppl
    assert random_only.to_json()["kind"] == "random"


def test_sweep_bad_input(llava_run, make_model):
    model, samples, scores, _ = llava_run
    common = {"targets": "given", "generations": 0, "progress": False}
    with pytest.raises(BadInput, match="kind"):
        canfast.sweep(model, samples, scores, kind="greedy", **common)
    with pytest.raises(BadInput, match="metric"):
        canfast.sweep(model, samples, scores, metric="acc", **common)
    with pytest.raises(BadInput, match="tau"):
        canfast.sweep(model, samples, scores, tau=0, **common)
    with pytest.raises(BadInput, match="schedule"):
        canfast.sweep(model, samples, scores, schedule=[0, 500], **common)
    other = make_model("llava", seed=1)
    with pytest.raises(BadInput, match="another model"):
        canfast.sweep(other, samples, scores, **common)


def test_evaluate_many_masks_per_pass(llava_run):
    """The evaluator's shared forward passes give the same metric as one mask per pass."""
    from canfast.sweep.evaluator import Evaluator

    model, samples, scores, _ = llava_run
    order = scores.ranking()
    sets = [order[:k] for k in (1, 3, 9, 27, 81)]
    wide = Evaluator(model, samples, batch_size=2, masks_per_pass=4, progress=False)
    narrow = Evaluator(model, samples, batch_size=3, masks_per_pass=1, progress=False)
    got, expected = wide(sets), narrow(sets)
    assert wide.calls == narrow.calls == 5
    assert got == pytest.approx(expected, rel=1e-5)
    assert len(set(got)) == 5
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)


def test_gen_ppl_metric(llava_run):
    """``gen-ppl``: the masked model answers, the unmasked model scores those answers."""
    from canfast.sweep.evaluator import Evaluator

    model, samples, scores, _ = llava_run
    order = scores.ranking()
    sets = [NeuronSet(()), order[:40]]
    evaluator = Evaluator(model, samples, metric="gen-ppl", max_new_tokens=3, progress=False)
    assert evaluator.masks_per_pass == 1
    got = evaluator(sets)
    for neurons, value in zip(sets, got):
        answers = canfast.generate(model, samples, neurons, max_new_tokens=3)
        produced = [s.with_target(a) for s, a in zip(samples, answers)]
        assert value == pytest.approx(evaluate(model, produced)[0].ppl, rel=1e-5)
    assert got[0] != got[1]


def test_sweep_of_mid_neurons(llava_run):
    model, samples, _, _ = llava_run
    scores = canfast.score(
        model, samples, unit="mid", targets="given", backend="torch", progress=False
    )
    assert all(name.endswith(".mid") for name in scores.sites)
    result = canfast.sweep(
        model,
        samples,
        scores,
        schedule=[2, 8, 32],
        tau=100.0,
        seeds=1,
        targets="given",
        masks_per_pass=2,
        generations=0,
        backend="torch",
        progress=False,
    )
    assert result.n_neurons == sum(model.site(s).channels for s in scores.sites)
    order = scores.ranking()
    # The grid, plus what refining the onset added below it.
    assert {2, 8, 32} <= set(result.curve.k)
    for k, ppl in zip(result.curve.k, result.curve.ppl):
        assert ppl == pytest.approx(masked_ppl(model, samples, order[:k]), rel=1e-5)
    assert result.curve.ppl[-1] > result.ppl0


def test_sweep_by_component_and_kind_masks_only_that_group(llava):
    """--by component / kind: one row per group, each a sweep over that group's sites alone."""
    from canfast.objective import with_targets
    from canfast.sweep import SweepConfig, SweepJob, sweep_by

    samples = with_targets(llava, tm.samples("llava", 3), "self", max_new_tokens=4)
    scores = canfast.score(llava, samples, targets="given", progress=False)
    config = SweepConfig(schedule=[1, 2, 4], seeds=1)
    job = SweepJob(llava, samples, scores, config, [1, 2, 4], batch_size=4, progress=False)
    by_component = sweep_by("component", job)
    assert [r["group"] for r in by_component] == ["vision", "projector", "language"]
    sizes = {s.component: 0 for s in llava.sites()}
    for site in llava.sites():
        sizes[site.component] += site.channels
    for row in by_component:
        assert row["n_neurons"] == sizes[row["group"]]
        assert row["n_samples"] == 3
    by_kind = sweep_by("kind", job)
    assert sorted(r["group"] for r in by_kind) == ["down", "gate", "up"]
    assert sum(r["n_neurons"] for r in by_kind) == sum(sizes.values())
    with pytest.raises(canfast.BadInput):
        sweep_by("category", job)


# ----- the pipeline and the strategy registry ---------------------------------------------------


def test_pipeline_run_matches_the_sweep_api(llava_run, tmp_path):
    """``canfast.run`` from Python: the same curve as ``canfast.sweep`` on the same scores, and
    the run directory holds the scores, the ranking, the strategy's files and the report."""
    model, samples, scores, result = llava_run
    config = canfast.SweepConfig(
        schedule=[1, 4, 16, 64, 160, 1000], seeds=1, masks_per_pass=3, generations=1
    )
    done = canfast.run(
        model,
        canfast.DataConfig(samples, targets="given", max_new_tokens=3, batch_size=2),
        scoring=canfast.ScoreConfig(backend="torch", progress=False),
        sweep=config,
        out=tmp_path / "run",
    )
    assert done.out == tmp_path / "run"
    names = {p.name for p in done.files}
    assert {"scores.safetensors", "neurons.json", "sweep.json", "generations.jsonl"} <= names
    assert "report.html" in names
    assert all(p.is_file() for p in done.files)
    assert done.result.curve.k == result.curve.k
    assert done.result.curve.ppl == pytest.approx(result.curve.ppl, rel=1e-5)
    assert (done.result.k1, done.result.k_star) == (result.k1, result.k_star)
    assert done.result.info["targets"] == "given"
    assert set(done.result.timings) >= {"targets_s", "base_s", "curves_s"}
    assert read_json(done.out / "sweep.json")["k_star"] == result.k_star


class _Constant:
    """A stand-in for a strategy with files of its own (like the exhaustive scan)."""

    kind = "constant"

    def __init__(self, n_samples: int) -> None:
        self.info = {"n_samples": n_samples}

    def write(self, run_dir):
        return [write_json(run_dir / "constant.json", self.info)]

    def summary(self, ranking=None):
        return f"constant over {self.info['n_samples']} samples"

    def summary_json(self):
        return dict(self.info)


def test_a_registered_strategy_writes_its_own_files(llava_run, tmp_path, monkeypatch):
    from canfast.sweep import strategy as registry

    model, samples, _, _ = llava_run
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register("constant", "a test strategy")(lambda job: _Constant(len(job.samples)))
    assert registry.strategy_names()[-1] == "constant"
    with pytest.raises(ValueError, match="twice"):
        registry.register("constant", "again")(lambda job: None)
    done = canfast.run(
        model,
        canfast.DataConfig(samples, targets="given"),
        scoring=canfast.ScoreConfig(backend="torch", progress=False),
        sweep=canfast.SweepConfig(kind="constant"),
        out=tmp_path / "run",
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "constant.json",
        "manifest.json",
        "neurons.json",
        "scores.safetensors",
    ]
    assert done.result.summary() == f"constant over {len(samples)} samples"
    with pytest.raises(BadInput, match="--by"):
        canfast.run(
            model,
            canfast.DataConfig(samples, targets="given"),
            sweep=canfast.SweepConfig(kind="constant", by=("component",)),
            out=tmp_path / "other",
        )
    assert not (tmp_path / "other").exists()


# ----- custom objectives and stacked mask batches -----------------------------------------------


def in_batch_contrastive(outputs, batch):
    """Each sample's mean-pooled logits must pick out itself among the batch: a loss that
    compares the samples of one batch with each other, like a sentence encoder's."""
    valid = batch.valid["language"].unsqueeze(-1).float()
    pooled = (outputs.logits.float() * valid).sum(1) / valid.sum(1)
    z = torch.nn.functional.normalize(pooled, dim=-1)
    logits = z @ z.T / 0.05
    target = torch.arange(batch.size, device=logits.device)
    return torch.nn.functional.cross_entropy(logits, target, reduction="none")


def test_stacked_masks_give_a_custom_objective_one_block_at_a_time(llava_run):
    model, samples, scores, _ = llava_run
    order = scores.ranking()
    sets = [order[:k] for k in (0, 5, 40, 200)]
    with masked(model, sets, backend="torch"):
        stacked = evaluate(model, samples, 3, in_batch_contrastive, masks=len(sets))
    for neurons, got in zip(sets, stacked, strict=True):
        with masked(model, neurons, backend="torch"):
            alone = evaluate(model, samples, 3, in_batch_contrastive)[0]
        assert got.tokens == alone.tokens == len(samples)
        assert got.nll == pytest.approx(alone.nll, rel=1e-5)
    assert len({round(e.nll, 6) for e in stacked}) == len(sets)


def test_contrastive_sweep_is_the_same_for_any_masks_per_pass(llava_run):
    model, samples, scores, _ = llava_run
    results = [
        canfast.sweep(
            model,
            samples,
            scores,
            schedule=[1, 4, 16, 64, 200],
            tau=0.5,
            onset=1.05,
            seeds=1,
            targets="given",
            batch_size=3,
            masks_per_pass=m,
            generations=0,
            objective=in_batch_contrastive,
            backend="torch",
            progress=False,
        )
        for m in (1, 4)
    ]
    one, four = results
    assert one.ppl0 == pytest.approx(four.ppl0, rel=1e-6)
    for ordering in ((one.curve, four.curve), (one.random[0], four.random[0])):
        ppl = [dict(zip(c.k, c.ppl, strict=True)) for c in ordering]
        common = sorted(set(ppl[0]) & set(ppl[1]))
        assert {1, 4} <= set(common)
        assert [ppl[1][k] for k in common] == pytest.approx([ppl[0][k] for k in common], rel=1e-5)
        assert (ordering[0].k1, ordering[0].k_star) == (ordering[1].k1, ordering[1].k_star)


def test_pipeline_scores_without_eos_when_asked(llava_run, tmp_path):
    """``DataConfig(score_eos=False)`` (``--no-score-eos``) reaches the scores, which say so,
    and a Model passed in keeps its own setting afterwards."""
    model, samples, scores, _ = llava_run
    runs = {}
    for score_eos in (True, False):
        runs[score_eos] = canfast.run(
            model,
            canfast.DataConfig(samples, targets="given", score_eos=score_eos),
            scoring=canfast.ScoreConfig(backend="torch", progress=False),
            out=tmp_path / str(score_eos),
        ).scores
        assert model.score_eos is True
    assert runs[True].meta["score_eos"] == "true" and runs[False].meta["score_eos"] == "false"
    site = runs[True].sites[0]
    torch.testing.assert_close(runs[True][site], scores[site], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(runs[True][site], runs[False][site])


@pytest.mark.parametrize("family", tm.FAMILIES)
@pytest.mark.parametrize("unit", ["out", "mid"])
def test_prefix_reuse_gives_the_metric_of_full_passes(family, unit):
    """The evaluator replays what precedes the earliest site of its pool, recorded once per
    batch, and the metric is that of full forward passes, on every family."""
    from canfast.sweep.evaluator import Evaluator

    model = tm.wrap(family, seed=3)
    samples = tm.samples(family, n=3)
    late = [s.name for s in model.sites(unit) if s.layer == tm.LAYERS - 1]
    g = torch.Generator().manual_seed(0)
    sets = [NeuronSet(())]
    for k in (1, 5, 17):
        picked = []
        for _ in range(k):
            site = late[int(torch.randint(len(late), (1,), generator=g))]
            channel = int(torch.randint(model.site(site).channels, (1,), generator=g))
            picked.append((site, channel))
        sets.append(NeuronSet(tuple(dict.fromkeys(picked))))
    common = {"batch_size": 2, "masks_per_pass": 3, "progress": False}
    reused = Evaluator(model, samples, sites=late, **common)
    full = Evaluator(model, samples, reuse=False, **common)
    got, expected = reused(sets), full(sets)
    assert reused.shared.replay and all(r is not None for r in reused.shared._records.values())
    assert len(reused.shared._records) == 2  # 3 samples in batches of 2
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0)
    assert len(set(got)) > 1


def test_prefix_reuse_drops_itself_where_a_replay_is_not_exact():
    """Mistral 3's Pixtral tower packs every image of a batch into one sequence, which a
    replay tiled by rows cannot reproduce: the evaluator's first-batch check sees the replay
    differ from a full pass, drops reuse, and the metric stays that of full passes."""
    from canfast.sweep.evaluator import Evaluator

    model = tm.wrap("mistral3", seed=3)
    samples = tm.samples("mistral3", n=2)
    sites = [s.name for s in model.sites("out")]
    sets = [NeuronSet(()), NeuronSet(((sites[0], 1), (sites[-1], 2)))]
    reused = Evaluator(model, samples, sites=sites, batch_size=2, masks_per_pass=2, progress=False)
    full = Evaluator(model, samples, reuse=False, batch_size=2, masks_per_pass=2, progress=False)
    got, expected = reused(sets), full(sets)
    assert not reused.shared.replay
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-6, atol=0)
