"""Exhaustive single-neuron scans against the naive loop: one hook zeroes one neuron, one full
forward each, in float64."""

from __future__ import annotations

import math
import re

import pytest
import torch

import canfast
from canfast import ablation, prefix
from canfast.data import batches
from canfast.errors import BadInput
from canfast.model import IGNORE
from canfast.neuron_scan import (
    Scan,
    calibration_probabilities,
    draw_calibration,
    estimated_recall,
    scan,
    spearman,
)
from tests import tiny_models

UNITS = ("out", "mid")


def _samples(family: str, n: int = 3):
    return tiny_models.samples(family, n)


def _zero_hook(site, channel):
    """A hook that zeroes one neuron: the site's output channel, or its input channel (mid)."""
    if site.unit == "out":

        def hook(module, args, output):
            output = output.clone()
            output[..., channel] = 0
            return output

        return site.module.register_forward_hook(hook)

    def pre(module, args):
        x = args[0].clone()
        x[..., channel] = 0
        return (x, *args[1:])

    return site.module.register_forward_pre_hook(pre)


def _corpus(model, encoded, objective=None):
    """Summed loss over the corpus and its normalizer, from full logits in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in encoded:
            outputs = model.forward(batch)
            if objective is not None:
                total += float(objective(outputs, batch).double().sum())
                count += batch.size
                continue
            logits = outputs.logits.double()
            scored = batch.labels != IGNORE
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[scored], batch.labels[scored], reduction="sum"
                )
            )
            count += int(scored.sum())
    return total, count


def naive_deltas(model, samples, site, batch_size, objective=None) -> torch.Tensor:
    encoded = [model.encode(chunk) for chunk in batches(samples, batch_size)]
    base, count = _corpus(model, encoded, objective)
    out = []
    for channel in range(site.channels):
        handle = _zero_hook(site, channel)
        try:
            total, _ = _corpus(model, encoded, objective)
        finally:
            handle.remove()
        out.append((total - base) / count)
    return torch.tensor(out, dtype=torch.float64)


def _assert_close_relative(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6) -> None:
    # Scan stores float32, whose rounding (6e-8 relative) stays well inside rtol; the absolute
    # floor covers neurons the loss does not depend on at all (delta exactly 0).
    floor = 1e-9 * float(want.abs().max().clamp_min(1e-30))
    err = (got.double() - want).abs()
    assert bool((err <= rtol * want.abs() + floor).all()), (
        f"max relative error {float((err / want.abs().clamp_min(1e-30)).max()):.3g}"
    )


@pytest.mark.parametrize("unit", UNITS)
@pytest.mark.parametrize("family", tiny_models.FAMILIES)
def test_scan_equals_naive_loop(family, unit):
    model = tiny_models.wrap(family, dtype=torch.float64)
    samples = _samples(family)
    # Two batches of different sizes, and a token budget that forces several blocks per site.
    result = scan(
        model,
        samples,
        unit=unit,
        targets="given",
        batch_size=2,
        max_batch_tokens=64,
        progress=False,
    )
    assert result.sites == [s.name for s in model.sites(unit)]
    for name in result.sites:
        want = naive_deltas(model, samples, model.site(name), batch_size=2)
        assert result[name].dtype == torch.float32
        assert not torch.isnan(result[name]).any()
        _assert_close_relative(result[name], want)


def _probe_estimate(model, samples, site, batch_size):
    """-(a * dL/da) summed over positions, from retained gradients (another route)."""
    encoded = [model.encode(chunk) for chunk in batches(samples, batch_size)]
    _, count = _corpus(model, encoded)
    total = torch.zeros(site.channels, dtype=torch.float64)
    kept = {}

    def hook(module, args, output):
        output.retain_grad()
        kept["a"] = output
        return output

    model.hf.requires_grad_(True)
    handle = site.module.register_forward_hook(hook)
    try:
        for batch in encoded:
            logits = model.forward(batch).logits.double()
            scored = batch.labels != IGNORE
            loss = torch.nn.functional.cross_entropy(
                logits[scored], batch.labels[scored], reduction="sum"
            )
            (loss / count).backward()
            a = kept["a"]
            valid = batch.valid["language"].unsqueeze(-1)
            total += torch.where(valid, -(a * a.grad), 0.0).sum((0, 1)).detach()
    finally:
        handle.remove()
        model.hf.requires_grad_(False)
    return total


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_estimate_is_first_order_effect(family):
    model = tiny_models.wrap(family, dtype=torch.float64)
    samples = _samples(family)
    result = scan(
        model, samples, sites="language.1.*", targets="given", batch_size=2, progress=False
    )
    for name in result.sites:
        want = _probe_estimate(model, samples, model.site(name), 2)
        torch.testing.assert_close(result.estimate[name].double(), want, rtol=1e-5, atol=1e-9)
    # CAN is the score canfast.score gives on the same targets.
    scores = canfast.score(model, samples, sites="language.1.*", targets="given", progress=False)
    for name in result.sites:
        torch.testing.assert_close(result.can[name], scores[name])


def test_custom_objective_delta_is_mean_loss_difference():
    model = tiny_models.wrap("llama", dtype=torch.float64)
    samples = _samples("llama")

    def first_logit(outputs, batch):
        return outputs.logits[:, 0, :3].double().pow(2).sum(-1)

    result = scan(
        model,
        samples,
        sites="language.0.down",
        targets="given",
        batch_size=2,
        objective=first_logit,
        progress=False,
    )
    want = naive_deltas(model, samples, model.site("language.0.down"), 2, first_logit)
    _assert_close_relative(result["language.0.down"], want)


def test_out_of_memory_halves_the_block_and_goes_on(monkeypatch):
    model = tiny_models.wrap("llama", dtype=torch.float64)
    samples = _samples("llama")
    real = ablation.run_block
    sizes = []

    def flaky(ablator, batch, site, cut, record, neurons):
        sizes.append(int(neurons.shape[0]))
        if neurons.shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(ablator, batch, site, cut, record, neurons)

    monkeypatch.setattr(ablation, "run_block", flaky)
    result = scan(
        model,
        samples,
        sites="language.1.down",
        targets="given",
        batch_size=3,
        max_batch_tokens=10**6,
        progress=False,
    )
    # 16 fails, 8 fails, then blocks of 4 cover the 16 neurons.
    assert sizes == [16, 8, 4, 4, 4, 4]
    assert result.overview["timings"]["block_halvings"] == 2
    want = naive_deltas(model, samples, model.site("language.1.down"), 3)
    _assert_close_relative(result["language.1.down"], want)


def test_one_record_pass_per_batch_serves_every_site(monkeypatch):
    model = tiny_models.wrap("llava", dtype=torch.float64)
    samples = _samples("llava")
    real = prefix.recording_sites
    groups = []

    def counted(cuts, sites):
        groups.append(len(sites))
        return real(cuts, sites)

    monkeypatch.setattr(prefix, "recording_sites", counted)
    result = scan(model, samples, targets="given", batch_size=2, progress=False)
    # Two batches, each recorded once for all sites of both components.
    assert groups == [len(result.sites)] * 2
    assert any(s.startswith("vision.") for s in result.sites)


def test_out_of_memory_in_a_shared_record_pass_halves_the_site_group(monkeypatch):
    model = tiny_models.wrap("llama", dtype=torch.float64)
    samples = _samples("llama")
    real = prefix.recording_sites
    groups = []

    def flaky(cuts, sites):
        groups.append(len(sites))
        if len(sites) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(cuts, sites)

    monkeypatch.setattr(prefix, "recording_sites", flaky)
    names = ["language.0.up", "language.0.down", "language.1.down"]
    result = scan(model, samples, sites=names, targets="given", batch_size=3, progress=False)
    # One batch: 3 sites fail, 1 (the halved limit) at a time goes on.
    assert groups == [3, 1, 1, 1]
    assert result.overview["timings"]["block_halvings"] == 1
    for name in names:
        want = naive_deltas(model, samples, model.site(name), 3)
        _assert_close_relative(result[name], want)


def test_other_errors_are_not_taken_for_out_of_memory(monkeypatch):
    model = tiny_models.wrap("llama")

    def broken(*args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(ablation, "run_block", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        scan(model, _samples("llama"), sites="language.0.down", targets="given", progress=False)


def test_language_sites_reuse_the_vision_tower_and_earlier_layers():
    model = tiny_models.wrap("llava")
    encoded = model.encode(_samples("llava", 2))
    with torch.no_grad(), prefix.timeline(model.hf) as recorded:
        model.forward(encoded)
    cut = {c.path for c in recorded.cut(model.site("language.1.down").module)}
    assert any(p.endswith("vision_tower") for p in cut)
    assert any(p.endswith("multi_modal_projector") for p in cut)
    assert any(p.endswith("layers.0") for p in cut)
    assert any(p.endswith("layers.1.self_attn") for p in cut)
    assert any(p.endswith("mlp.gate_proj") for p in cut) and any(
        p.endswith("mlp.up_proj") for p in cut
    )
    # Nothing inside a cut module is cut again, and nothing after the site is.
    for path in cut:
        assert not any(other != path and other.startswith(path + ".") for other in cut)
    assert not any("layers.1.mlp.down_proj" in p or "lm_head" in p for p in cut)


def test_replay_refuses_rows_it_did_not_record():
    model = tiny_models.wrap("llama")
    site = model.site("language.1.down")
    batch = model.encode(_samples("llama", 2))
    with torch.no_grad(), prefix.timeline(model.hf) as recorded:
        model.forward(batch)
    cut = recorded.cut(site.module)
    with torch.no_grad(), prefix.recording(cut, recorded.call(site.module)) as record:
        model.forward(batch)
    # The Llama MLP returns its down projection's output: the replay overrides the MLP.
    assert record.target is model.hf.model.layers[1].mlp
    variants = record.site_output.repeat(2, 1, 1)
    with torch.no_grad(), prefix.replaying(cut, record, variants, 2):
        with pytest.raises(RuntimeError, match="does not replay as recorded"):
            model.forward(batch.repeat(3))


# ----- screening -------------------------------------------------------------------------------


def test_recall_estimate_is_exact_with_a_full_census():
    delta = torch.tensor([5.0, -4.0, 3.0, 0.1, 0.2, 2.5, 0.0, -0.3], dtype=torch.float64)
    screened = [0, 2, 3]  # misses -4.0 (index 1): the true top-3 by |delta| is {0, 1, 2}
    rest = [1, 4, 5, 6, 7]
    found = estimated_recall(delta, screened, rest, pool=len(rest))
    assert found["recall"] == pytest.approx(2 / 3)
    assert found["screened_above_threshold"] == 2 and found["calibration_above_threshold"] == 1


@pytest.mark.parametrize("pool, size", [(13, 8), (10, 3), (500, 64), (64, 64)])
def test_calibration_probabilities_sum_to_the_sample_and_favour_the_screens_near_misses(pool, size):
    p = calibration_probabilities(pool, size)
    assert p.shape == (pool,) and float(p.sum()) == pytest.approx(size)
    assert bool((p > 0).all()) and bool((p <= 1).all())
    assert bool((p[:-1] >= p[1:] - 1e-12).all())  # never less likely higher in the order
    # Half of every probability is the uniform share, so no weight exceeds 2x a uniform one.
    assert float(p.min()) >= 0.5 * size / pool - 1e-12


def test_calibration_draws_each_place_with_its_probability():
    p = calibration_probabilities(40, 6)
    counts = torch.zeros(40, dtype=torch.float64)
    draws = 4000
    for seed in range(draws):
        places = draw_calibration(p, torch.Generator().manual_seed(seed))
        assert len(places) == 6 and len(set(places)) == 6
        counts[places] += 1
    # Binomial standard error of a frequency is at most 0.5 / sqrt(draws) = 0.008.
    assert float((counts / draws - p).abs().max()) < 0.04


def test_weighted_recall_estimate_is_unbiased_where_uniform_sampling_mostly_sees_nothing():
    # 2,000 unscreened neurons in the screen's order; the true top-50 has 40 screened and 10
    # just below the screen's cut (places 0-9), as a good screen leaves them.
    screened = list(range(50))
    delta = torch.full((2050,), 0.01, dtype=torch.float64)
    delta[:40] = torch.linspace(10, 5, 40)
    delta[40:50] = torch.linspace(2.9, 2, 10)  # screened, but not in the top 50
    delta[50:60] = torch.linspace(4, 3, 10)  # the misses
    rest = list(range(50, 2050))
    truth = 40 / 50
    p = calibration_probabilities(len(rest), 64)
    estimates, uniform = [], []
    for seed in range(300):
        places = draw_calibration(p, torch.Generator().manual_seed(seed))
        cal = [rest[i] for i in places]
        got = estimated_recall(delta, screened, cal, len(rest), [float(p[i]) for i in places])
        estimates.append((got["missed_estimate"], got["recall"]))
        picks = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:64]
        flat = estimated_recall(delta, screened, [rest[i] for i in picks.tolist()], len(rest))
        uniform.append(flat["recall"])
    # Every miss lies above the threshold (the 50th |delta| measured), so the weighted count of
    # the misses drawn estimates the 10 without bias, and the recall lies near the truth.
    assert sum(m for m, _ in estimates) / len(estimates) == pytest.approx(10, rel=0.05)
    assert abs(sum(r for _, r in estimates) / len(estimates) - truth) < 0.03
    # A uniform sample of 64 from 2,000 draws none of the 10 misses about 72% of the time, and
    # then says recall 1.0.
    assert sum(r == 1.0 for r in uniform) > 150


def test_screening_finds_the_planted_neurons_and_says_so():
    # Constructed: only three output channels of language.1.down are alive, so the exact top-3
    # by |delta| is known, the estimate of every dead channel is exactly 0, and no calibration
    # neuron can lie above the threshold.
    model = tiny_models.wrap("llama", dtype=torch.float64)
    site = model.site("language.1.down")
    planted = [3, 7, 12]
    dead = [j for j in range(site.channels) if j not in planted]
    with torch.no_grad():
        site.module.weight[dead] = 0.0
    samples = _samples("llama")
    full = scan(model, samples, sites=site.name, targets="given", progress=False)
    screened = scan(
        model,
        samples,
        sites=site.name,
        targets="given",
        verify_top=3,
        calibrate=8,
        progress=False,
    )
    by_size = torch.sort(full[site.name].abs(), descending=True).indices[:3].tolist()
    assert sorted(by_size) == planted
    delta = screened[site.name]
    known = (~torch.isnan(delta)).nonzero().flatten().tolist()
    assert set(planted) <= set(known) and len(known) == 3 + 8
    torch.testing.assert_close(delta[known], full[site.name][known])
    info = screened.overview["screening"]
    assert info["verify_top"] == 3 and info["calibration"] == 8
    assert info["recall"] == 1.0 and info["calibration_above_threshold"] == 0
    # No hit: the rule of three at the smallest inclusion probability of the 13 left out bounds
    # the missed at 3 / p_min (at most the 13 themselves).
    least = float(calibration_probabilities(13, 8).min())
    assert info["recall_lower_95"] == pytest.approx(3 / (3 + min(13, 3 / least)))
    assert screened.overview["exact_ablations"] == 11


def test_verify_top_larger_than_the_neurons_is_bad_input():
    model = tiny_models.wrap("llama")
    with pytest.raises(BadInput, match="verify-top"):
        scan(model, _samples("llama"), sites="language.0.down", verify_top=10**6, progress=False)


# ----- results and files -----------------------------------------------------------------------


def test_files_round_trip_and_summary(tmp_path):
    model = tiny_models.wrap("llava")
    result = scan(
        model, _samples("llava"), sites="language.*.down", targets="given", progress=False
    )
    result.save(tmp_path)
    assert (tmp_path / "scan.safetensors").is_file() and (tmp_path / "scan.json").is_file()
    loaded = Scan.load(tmp_path)
    assert loaded.sites == result.sites
    for name in result.sites:
        torch.testing.assert_close(loaded[name], result[name])
        torch.testing.assert_close(loaded.estimate[name], result.estimate[name])
        torch.testing.assert_close(loaded.can[name], result.can[name])
    assert loaded.meta["model_fingerprint"] == model.fingerprint()
    loaded.check_model(model)
    summary = loaded.overview
    assert set(summary["spearman"]["by_component"]) == {"language"}
    assert set(summary["spearman"]["by_kind"]) == {"down"}
    top = result.top(5)
    values = [result[s][c].item() for s, c in top]
    assert values == sorted(values, reverse=True)
    assert summary["top_neurons"][0]["neuron"] == top.ids()[0]
    assert summary["timings"]["ablations_per_s"] > 0
    assert summary["exact_ablations"] == summary["neurons"] == 2 * tiny_models.HIDDEN


def test_scan_from_another_model_is_refused(tmp_path):
    result = scan(
        tiny_models.wrap("llama"),
        _samples("llama"),
        sites="language.0.down",
        targets="given",
        progress=False,
    )
    result.save(tmp_path)
    other = tiny_models.wrap("llama", seed=1)
    with pytest.raises(BadInput, match="another model"):
        Scan.load(tmp_path).check_model(other)


def test_load_refuses_a_directory_without_a_scan(tmp_path):
    with pytest.raises(BadInput, match="holds no scan"):
        Scan.load(tmp_path)


def test_spearman_handles_ties_and_nan():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0, math.nan])
    assert spearman(x, x * 10) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(torch.ones(4), torch.arange(4.0)) is None


# ----- the command line ------------------------------------------------------------------------


def _cli(*args, cwd):
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "canfast.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_single_writes_the_scan_and_its_report(tmp_path):
    run = tmp_path / "run"
    done = _cli(
        "sweep",
        "--sweep-kind",
        "single",
        "--sites",
        "language.2.down",
        "--limit",
        "4",
        "--targets",
        "given",
        "--out",
        run,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "Spearman vs exact delta" in done.stdout
    for name in ("scan.safetensors", "scan.json", "report.html", "scores.safetensors"):
        assert (run / name).is_file(), name
    assert not (run / "sweep.json").exists()
    page = (run / "report.html").read_text()
    assert "Single-neuron scan" in page and "scan_can.png" in page
    # Named by the run's directory, not the staging directory it was drawn in.
    assert f"run {run.name} ·" in page and ".partial" not in page
    loaded = Scan.load(run)
    assert loaded.sites == ["language.2.down"] and not torch.isnan(loaded["language.2.down"]).any()
    # The report command redraws it.
    again = _cli("report", run, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"run {run.name} ·" in (run / "report.html").read_text()

    # Bad input: a scan's scores from another model, and more neurons to verify than exist.
    other = _cli(
        "sweep",
        "--sweep-kind",
        "single",
        "--model",
        "builtin:tiny-instructblip",
        "--scores",
        run,
        "--limit",
        "2",
        "--targets",
        "given",
        "--out",
        tmp_path / "o",
        cwd=tmp_path,
    )
    assert other.returncode == 2 and "another model" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    too_many = _cli(
        "sweep",
        "--sweep-kind",
        "single",
        "--sites",
        "language.2.down",
        "--limit",
        "2",
        "--targets",
        "given",
        "--verify-top",
        "100000",
        "--out",
        tmp_path / "t",
        cwd=tmp_path,
    )
    assert too_many.returncode == 2 and "--verify-top 100000" in too_many.stderr
    assert not (tmp_path / "t" / "scan.json").exists()


def test_block_budget_on_the_cpu_keeps_the_widest_ffn_activation_within_its_bytes():
    model = tiny_models.wrap("llava", dtype=torch.float64)
    widest = max(s.channels for s in model.all_sites("mid"))
    tokens = ablation.block_tokens(model)
    assert tokens == ablation.CPU_BLOCK_BYTES // (widest * 8)
    assert tokens * widest * 8 <= ablation.CPU_BLOCK_BYTES < (tokens + 1) * widest * 8
    # The Ablator and the scan take it when no budget is given.
    assert ablation.Ablator(model, []).max_batch_tokens == tokens
    assert ablation.Ablator(model, [], max_batch_tokens=64).max_batch_tokens == 64


def test_block_budget_on_an_accelerator_is_the_gpu_default():
    class OnGpu:
        device = torch.device("cuda")
        dtype = torch.bfloat16

    assert ablation.block_tokens(OnGpu()) == ablation.GPU_BLOCK_TOKENS


def test_scan_with_the_default_budget_equals_one_block_per_site(monkeypatch):
    """The default CPU budget, made small enough here to cut each site into blocks of three
    neurons, gives the deltas of one block holding every neuron."""
    model = tiny_models.wrap("llava", dtype=torch.float64)
    samples = _samples("llava")
    whole = scan(model, samples, sites="language.*.down", targets="given", batch_size=2,
                 max_batch_tokens=10**7, progress=False)  # fmt: skip
    widest = max(s.channels for s in model.all_sites("mid"))
    tokens = model.encode(samples[:2]).labels.numel()
    monkeypatch.setattr(ablation, "CPU_BLOCK_BYTES", 3 * tokens * widest * 8)
    assert ablation.block_tokens(model) // tokens == 3
    assert all(model.site(name).channels > 3 for name in whole.sites)
    blocks = scan(model, samples, sites="language.*.down", targets="given", batch_size=2,
                  progress=False)  # fmt: skip
    for name in whole.sites:
        _assert_close_relative(blocks[name], whole[name].double(), rtol=1e-9)


def test_progress_counts_whole_neurons(capsys):
    """The bar counts neuron-batches, so while a site is part done its scaled count is a
    fraction: it is shown in whole neurons."""
    model = tiny_models.wrap("llama")
    site = model.sites()[0]
    scan(model, _samples("llama"), sites=site.name, targets="given", batch_size=2)
    err = capsys.readouterr().err
    counts = re.findall(r"\| *([0-9.]+)/([0-9.]+) \[", err)
    assert counts, err
    assert all("." not in n and "." not in total for n, total in counts), counts
    assert counts[-1] == (str(site.channels), str(site.channels))
