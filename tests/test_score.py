"""CAN scores against an independent float64 computation, and the Scores file.

The reference runs each sample alone (so every position is real), captures every site's full
activation with its own hooks, takes the gradient of that sample's mean target NLL with plain
autograd, and reduces: ``S[i, j] = mean_t |g|**alpha * |a|``, ``I = mean_i S``.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F

import canfast
from canfast import BadInput, Scores

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHAS = (0.0, 0.5, 1.0)


def reference_loss(model, sample, inputs, logits):
    """The sample's mean NLL over its target tokens, labels built here (see test_encode)."""
    tok = model.tokenizer
    wanted = tok.convert_tokens_to_ids(sample.target.split())
    if model.task == "masked":
        rows = logits[0][inputs["input_ids"][0] == tok.mask_token_id]
        return F.cross_entropy(rows, torch.tensor(wanted))
    wanted = torch.tensor([*wanted, tok.eos_token_id])
    if model.task == "seq2seq":
        return F.cross_entropy(logits[0], wanted)
    n = len(wanted)
    assert inputs["input_ids"][0, -n:].tolist() == wanted.tolist()
    return F.cross_entropy(logits[0, -n - 1 : -1], wanted)


def capture(model, samples, unit, loss_fn=None):
    """Per sample, per site: the activation and dL_i/da, float64, from a model whose parameters
    keep requiring gradients (so no detached leaves are needed). Values are copied when the
    module runs, so a later in-place change of the tensor cannot reach them."""
    sites = model.sites(unit)
    records = []
    for sample in samples:
        batch = model.encode([sample])
        seen: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor] = {}
        handles = []
        for site in sites:
            if unit == "out":

                def hook(module, args, output, name=site.name, seen=seen, values=values):
                    seen[name] = output
                    values[name] = output.detach().clone()

                handles.append(site.module.register_forward_hook(hook))
            else:

                def pre(module, args, name=site.name, seen=seen, values=values):
                    seen[name] = args[0]
                    values[name] = args[0].detach().clone()

                handles.append(site.module.register_forward_pre_hook(pre))
        try:
            with torch.enable_grad():
                outputs = model.forward(batch)
                if loss_fn is None:
                    loss = reference_loss(model, sample, batch.inputs, outputs.logits)
                else:
                    loss = loss_fn(outputs, batch).sum()
                names = list(seen)
                grads = torch.autograd.grad(loss, [seen[n] for n in names], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        assert sorted(names) == sorted(s.name for s in sites)
        record = {}
        for name, grad in zip(names, grads):
            a = values[name]
            assert a.dtype == torch.float64
            g = torch.zeros_like(a) if grad is None else grad
            channels = a.shape[-1]
            record[name] = (a.reshape(-1, channels).abs(), g.reshape(-1, channels).abs())
        records.append(record)
    return records


def reduce(records, alpha):
    """I, std, mean |a|, mean |g| per site from the captured tensors."""
    out = {}
    for name in records[0]:
        s = torch.stack([(g.pow(alpha) * a).mean(0) for a, g in (r[name] for r in records)])
        act = torch.stack([r[name][0].mean(0) for r in records])
        grad = torch.stack([r[name][1].mean(0) for r in records])
        out[name] = (s.mean(0), s.std(0, unbiased=False), act.mean(0), grad.mean(0))
    return out


def assert_scores_match(scores: Scores, expected: dict, what: str) -> None:
    assert sorted(scores.sites) == sorted(expected)
    for name, (value, std, act, grad) in expected.items():
        scale = value.abs().max().item()
        assert scores[name].dtype == torch.float32
        got = scores[name].double()
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-7 * scale, msg=f"{what} {name}")
        stats = scores.stats[name]
        # std of fp32 per-sample means is exact only to about 1e-7 of the mean.
        torch.testing.assert_close(
            stats["std"].double(), std, rtol=1e-4, atol=1e-6 * scale, msg=f"{what} {name} std"
        )
        for key, ref in (("act", act), ("grad", grad)):
            torch.testing.assert_close(
                stats[key].double(),
                ref,
                rtol=1e-5,
                atol=1e-7 * ref.abs().max().item(),
                msg=f"{what} {name} {key}",
            )


@pytest.fixture(scope="module")
def double_models():
    return {}


def double_model(cache, family):
    if family not in cache:
        cache[family] = tm.wrap(family, dtype=torch.float64)
    return cache[family]


@pytest.mark.parametrize("path", ["hooks", "fused"])
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("family", tm.FAMILIES)
def test_scores_match_float64_reference(double_models, family, unit, path):
    """Both scoring paths, the hooks and the sinks fed inside masked_linear's backward, give
    the float64 reference on every family, both units, several alphas, with and without
    padding (batches of 2 pad the shorter sample)."""
    model = double_model(double_models, family)
    samples = tm.samples(family, 3)
    records = capture(model, samples, unit)
    # The gradient reaches every site the loss depends on; LLaVA's last vision layer is computed
    # but unused (features come from the second-to-last layer), so its gradient is zero.
    for name, (a, g) in records[0].items():
        assert a.abs().max() > 0
        unused = family == "llava" and name.startswith("vision.2.")
        assert (g.max() == 0) == unused, name
    for alpha in ALPHAS:
        expected = reduce(records, alpha)
        for batch_size in (1, 2):
            scores = canfast.score(
                model,
                samples,
                alpha=alpha,
                unit=unit,
                targets="given",
                batch_size=batch_size,
                backend="torch",
                progress=False,
                path=path,
            )
            what = f"{path} {family} {unit} alpha={alpha} bs={batch_size}"
            assert_scores_match(scores, expected, what)
            assert scores.meta["alpha"] == repr(alpha)
            assert scores.meta["unit"] == unit
            assert scores.meta["n_samples"] == "3"


@pytest.mark.skipif(not canfast.ops.available("cpp"), reason="canfast._C is not built")
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("family", tm.FAMILIES)
def test_cpp_backend_matches_torch(make_model, family, unit):
    """The compiled CPU kernels score whole float32 models as the torch reference does: the
    fused path (cpp's default) against the hook path on the torch backend."""
    model = make_model(family)
    samples = tm.samples(family, 3)
    runs = {
        backend: canfast.score(
            model,
            samples,
            unit=unit,
            targets="given",
            batch_size=2,
            backend=backend,
            progress=False,
            path=path,
        )
        for backend, path in (("torch", "hooks"), ("cpp", "fused"))
    }
    for name in runs["torch"].sites:
        torch.testing.assert_close(runs["cpp"][name], runs["torch"][name], rtol=1e-5, atol=1e-7)
        for key in ("act", "grad"):
            torch.testing.assert_close(
                runs["cpp"].stats[name][key], runs["torch"].stats[name][key], rtol=1e-5, atol=1e-7
            )


@pytest.mark.parametrize("family", ["llava", "llama"])
def test_triton_backend_matches_torch(make_model, family):
    """canfast.score through the Triton kernels (the interpreter on CPU) gives the reference."""
    if not canfast.ops.available("triton"):
        pytest.fail("triton is part of the test extras and must be importable")
    model = make_model(family)
    samples = tm.samples(family, 2)
    for unit in ("out", "mid"):
        runs = {
            backend: canfast.score(
                model,
                samples,
                unit=unit,
                targets="given",
                batch_size=2,
                backend=backend,
                progress=False,
            )
            for backend in ("torch", "triton")  # hooks, and the fused path (triton's default)
        }
        for name in runs["torch"].sites:
            torch.testing.assert_close(
                runs["triton"][name], runs["torch"][name], rtol=1e-5, atol=1e-7
            )


def test_alpha_changes_scores(double_models):
    """The three alphas give different rankings material: guards against alpha being ignored."""
    model = double_model(double_models, "llama")
    samples = tm.samples("llama", 3)
    runs = [
        canfast.score(model, samples, alpha=a, targets="given", backend="torch", progress=False)
        for a in ALPHAS
    ]
    for first, second in ((0, 1), (1, 2), (0, 2)):
        diff = (runs[first]["language.0.up"] - runs[second]["language.0.up"]).abs().max()
        assert diff > 1e-3
    # alpha = 0 is the mean |a|, whatever the gradient.
    torch.testing.assert_close(runs[0]["language.1.down"], runs[0].stats["language.1.down"]["act"])


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_parameters_untouched(make_model, backend):
    model = make_model("llava")
    frozen = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    for name, p in model.hf.named_parameters():
        p.requires_grad_(name not in frozen)
    flags = {n: p.requires_grad for n, p in model.hf.named_parameters()}
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    canfast.score(model, tm.samples("llava", 2), targets="given", backend=backend, progress=False)
    assert {n: p.requires_grad for n, p in model.hf.named_parameters()} == flags
    assert all(p.grad is None for p in model.hf.parameters())
    after = model.hf.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # No hook or route is left behind.
    for site in model.all_sites("out"):
        assert not site.module._forward_hooks and not site.module._forward_pre_hooks
        assert "forward" not in vars(site.module)


def test_failed_scoring_restores_flags(make_model):
    model = make_model("llama")

    def broken(outputs, batch):
        raise RuntimeError("objective failed")

    with pytest.raises(RuntimeError, match="objective failed"):
        canfast.score(
            model, tm.samples("llama", 2), targets="given", objective=broken, progress=False
        )
    assert all(p.requires_grad for p in model.hf.parameters())
    for site in model.all_sites("out"):
        assert not site.module._forward_hooks
        assert "forward" not in vars(site.module)


def test_custom_objective_drives_scoring(double_models):
    model = double_model(double_models, "llama")
    samples = tm.samples("llama", 3)

    def objective(outputs, batch):
        # Per sample: the summed logit of token 7 over its target positions.
        picked = outputs.logits[..., 7] * batch.target_mask
        return picked.sum(dim=1)

    records = capture(model, samples, "out", loss_fn=objective)
    for unit_records in records:
        assert all(g.max() > 0 for _, g in unit_records.values())
    expected = reduce(records, 0.5)
    for batch_size in (1, 3):
        scores = canfast.score(
            model,
            samples,
            alpha=0.5,
            targets="given",
            objective=objective,
            batch_size=batch_size,
            backend="torch",
            progress=False,
        )
        assert_scores_match(scores, expected, f"custom bs={batch_size}")
        assert scores.meta["objective"] == "objective"
    default = canfast.score(model, samples, targets="given", backend="torch", progress=False)
    assert (default["language.0.up"] - scores["language.0.up"]).abs().max() > 1e-3


def test_site_selection(double_models):
    model = double_model(double_models, "llava")
    samples = tm.samples("llava", 2)
    full = canfast.score(model, samples, targets="given", backend="torch", progress=False)
    part = canfast.score(
        model,
        samples,
        targets="given",
        sites="language.*",
        kinds=["down", "gate"],
        backend="torch",
        progress=False,
    )
    assert part.sites == [
        "language.0.gate",
        "language.0.down",
        "language.1.gate",
        "language.1.down",
    ]
    for name in part.sites:
        torch.testing.assert_close(part[name], full[name])
    with pytest.raises(BadInput, match="matches no site"):
        canfast.score(model, samples, targets="given", components=["qformer"], progress=False)


@pytest.mark.parametrize("family", ["llama", "llava", "instructblip", "bert", "t5"])
def test_self_targets_are_greedy_answers(make_model, family):
    model = make_model(family)
    samples = tm.samples(family, 3)
    own = canfast.score(model, samples, targets="self", max_new_tokens=3, progress=False)
    answers = canfast.generate(model, samples, max_new_tokens=3)
    given = canfast.score(
        model,
        [s.with_target(a) for s, a in zip(samples, answers)],
        targets="given",
        progress=False,
    )
    for name in own.sites:
        torch.testing.assert_close(own[name], given[name])
    assert own.meta["targets"] == "self"


def test_bad_arguments(make_model):
    model = make_model("llama")
    samples = tm.samples("llama", 1)
    with pytest.raises(BadInput, match="alpha"):
        canfast.score(model, samples, alpha=1.5, targets="given", progress=False)
    with pytest.raises(BadInput, match="alpha"):
        canfast.score(model, samples, alpha=-0.1, targets="given", progress=False)
    with pytest.raises(BadInput, match="no samples"):
        canfast.score(model, [], targets="given", progress=False)
    with pytest.raises(BadInput, match="targets"):
        canfast.score(model, samples, targets="reference", progress=False)
    with pytest.raises(BadInput, match="no target"):
        canfast.score(model, [s.with_target(None) for s in samples], targets="given")


# ----- the Scores object and its file ---------------------------------------------------------


@pytest.fixture(scope="module")
def llava_scores():
    model = tm.wrap("llava")
    scores = canfast.score(
        model, tm.samples("llava", 2), targets="given", backend="torch", progress=False
    )
    return model, scores


def test_save_load_round_trip(llava_scores, tmp_path):
    model, scores = llava_scores
    path = tmp_path / "scores.safetensors"
    scores.save(path)
    loaded = Scores.load(path)
    assert loaded.sites == scores.sites
    for name in scores.sites:
        assert torch.equal(loaded[name], scores[name])
        assert loaded.stats[name].keys() == {"std", "act", "grad"}
        for key, tensor in scores.stats[name].items():
            assert torch.equal(loaded.stats[name][key], tensor)
    assert loaded.meta == scores.meta
    for key in ("alpha", "unit", "targets", "model", "model_fingerprint", "data_fingerprint"):
        assert loaded.meta[key]
    assert loaded.meta["model_fingerprint"] == model.fingerprint()
    assert loaded.meta["n_samples"] == "2"
    assert loaded.meta["canfast_version"] == canfast.__version__
    loaded.check_model(model)
    assert loaded.top(10).ids() == scores.top(10).ids()


def test_load_rejects_bad_files(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(BadInput, match="not found"):
        Scores.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(BadInput):
        Scores.load(garbage)


def test_top_order(llava_scores):
    _, scores = llava_scores
    every = torch.cat([scores[n] for n in scores.sites])
    ranking = scores.ranking()
    assert len(ranking) == every.numel() == sum(scores[n].numel() for n in scores.sites)
    values = [scores[site][channel].item() for site, channel in ranking]
    assert values == sorted(values, reverse=True)
    assert list(ranking.scores) == values
    assert values[0] == every.max().item()
    top = scores.top(7)
    assert len(top) == 7 and top.ids() == ranking.ids()[:7]
    assert len(set(ranking.ids())) == len(ranking)


def test_top_breaks_ties_by_site_then_channel():
    scores = Scores({"b.0.up": torch.tensor([1.0, 3.0, 1.0]), "a.0.up": torch.tensor([3.0, 1.0])})
    assert scores.ranking().ids() == [
        "b.0.up:1",
        "a.0.up:0",
        "b.0.up:0",
        "b.0.up:2",
        "a.0.up:1",
    ]


def test_check_model_refuses_other_models(llava_scores, make_model):
    model, scores = llava_scores
    scores.check_model(model)
    other = make_model("llava", seed=1)
    with pytest.raises(BadInput, match="another model"):
        scores.check_model(other)
    # Same architecture, one site's weights changed.
    edited = make_model("llava")
    with torch.no_grad():
        edited.site("language.1.down").module.weight.mul_(1.5)
    with pytest.raises(BadInput, match="another model"):
        scores.check_model(edited)
    # A site this model lacks.
    foreign = Scores({"qformer.0.up": torch.zeros(tm.FFN)})
    with pytest.raises(BadInput, match="does not exist"):
        foreign.check_model(model)
    wrong_width = Scores({"language.0.up": torch.zeros(tm.FFN + 1)})
    with pytest.raises(BadInput, match="does not exist"):
        wrong_width.check_model(model)


def test_running_totals_per_call_and_sample():
    """The totals of a run, folded per site width, equal the per-sample means taken one call at
    a time: a site called twice in one batch counts each call's samples, and a sample with no
    row at a site (an expert no token was routed to) is not counted."""
    from types import SimpleNamespace

    from canfast.score import _Totals

    sites = [SimpleNamespace(name=n, channels=c) for n, c in (("a", 5), ("b", 5), ("c", 3))]
    totals = _Totals(sites)
    g = torch.Generator().manual_seed(0)
    calls = []  # (site, sums [B, 3, C], counts [B]) as one batch, then a second batch
    for _ in range(2):  # two batches
        for name, channels, counts in (
            ("a", 5, [4, 2]),
            ("b", 5, [3, 0]),
            ("a", 5, [1, 5]),  # a second call of site a in the same batch
            ("c", 3, [2, 2]),
        ):
            counts = torch.tensor(counts)
            sums = torch.rand(2, 3, channels, generator=g) * (counts > 0)[:, None, None]
            calls.append((name, sums, counts))
            totals.add(name, sums, counts)
        totals.flush()
    results = totals.results()
    for site in sites:
        means = [
            s[i].double() / k[i]
            for name, s, k in calls
            if name == site.name
            for i in range(2)
            if k[i] > 0
        ]
        per_sample = torch.stack(means)  # [samples seen, 3, C]
        mean, stats = results[site.name]
        want = per_sample.mean(0)
        torch.testing.assert_close(mean, want[0].float())
        torch.testing.assert_close(stats["act"], want[1].float())
        torch.testing.assert_close(stats["grad"], want[2].float())
        torch.testing.assert_close(stats["std"], per_sample[:, 0].std(0, correction=0).float())
    assert (
        results["a"][0].untyped_storage().data_ptr() != results["b"][0].untyped_storage().data_ptr()
    )
