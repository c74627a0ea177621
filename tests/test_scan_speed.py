"""The scan's speed paths against their plain counterparts: the vocabulary projection fused with
the loss (target_logits), and the first-order estimate and CAN from one backward
(first_order)."""

from __future__ import annotations

import pytest
import torch

import canfast
from canfast import prefix, target_logits
from canfast.data import batches
from canfast.errors import BadInput
from canfast.first_order import estimate_and_can, first_order
from canfast.model import IGNORE
from canfast.neuron_scan import scan
from canfast.target_logits import (
    DeferredLogits,
    linear_cross_entropy,
    target_losses,
    target_only,
)
from tests import tiny_models
from tests.test_scan import _assert_close_relative, naive_deltas


def _dense_nll(hidden, weight, bias, targets, accumulate):
    logits = torch.nn.functional.linear(hidden, weight, bias).to(accumulate)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_loss_equals_cross_entropy_of_the_projection(monkeypatch, bias, dtype):
    # Tiles that split rows and vocabulary unevenly, so every edge case of the running
    # logsumexp and of the target lookup across tiles is met.
    monkeypatch.setattr(target_logits, "ROW_TILE", 4)
    monkeypatch.setattr(target_logits, "VOCAB_TILE", 7)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 6, generator=g, dtype=dtype)
    weight = 3 * torch.randn(23, 6, generator=g, dtype=dtype)
    b = torch.randn(23, generator=g, dtype=dtype) if bias else None
    # Targets in the first, a middle and the last (partial) tile.
    targets = torch.tensor([0, 6, 7, 13, 14, 20, 21, 22, 3, 22, 0])
    got = linear_cross_entropy(hidden, weight, b, targets, dtype)
    want = _dense_nll(hidden, weight, b, targets, dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=rtol, atol=0.0)


def test_fused_loss_in_bfloat16_projects_each_tile_as_the_head_would(monkeypatch):
    monkeypatch.setattr(target_logits, "VOCAB_TILE", 5)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 8, generator=g).bfloat16()
    weight = torch.randn(17, 8, generator=g).bfloat16()
    targets = torch.randint(0, 17, (9,), generator=g)
    got = linear_cross_entropy(hidden, weight, None, targets, torch.float32)
    want = _dense_nll(hidden, weight, None, targets, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_fused_loss_survives_huge_and_negative_infinite_logits(monkeypatch):
    monkeypatch.setattr(target_logits, "VOCAB_TILE", 2)
    # A row whose first tiles are all -inf (a masked vocabulary) and one with huge logits.
    hidden = torch.eye(2, dtype=torch.float64)
    weight = torch.tensor(
        [[0.0, 0.0], [0.0, 1.0], [1.0, 2.0], [900.0, 3.0], [899.0, 0.0]], dtype=torch.float64
    )
    bias = torch.tensor([-torch.inf, -torch.inf, 0.0, 0.0, 0.0], dtype=torch.float64)
    targets = torch.tensor([3, 2])
    got = linear_cross_entropy(hidden, weight, bias, targets, torch.float64)
    want = _dense_nll(hidden, weight, bias, targets, torch.float64)
    assert bool(torch.isfinite(want).all())
    torch.testing.assert_close(got, want)


def test_deferred_logits_compute_themselves_for_any_other_operation():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(5, 4, generator=g, dtype=torch.float64)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(9, generator=g, dtype=torch.float64)
    deferred = DeferredLogits(hidden, weight, bias)
    assert deferred.shape == (5, 9) and deferred.dtype == torch.float64
    dense = torch.nn.functional.linear(hidden, weight, bias)
    # Gemma-style soft-capping reads the logits: it sees the head's numbers.
    capped = torch.tanh(deferred / 30.0) * 30.0
    assert type(capped) is torch.Tensor
    torch.testing.assert_close(capped, torch.tanh(dense / 30.0) * 30.0)
    labels = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(
        target_losses(capped, labels, compact=True),
        torch.nn.functional.cross_entropy(capped, labels[0], reduction="sum").reshape(1),
    )


def _fused_calls(monkeypatch) -> list[int]:
    calls = []
    real = target_logits.linear_cross_entropy

    def spy(hidden, *args):
        calls.append(hidden.shape[0])
        return real(hidden, *args)

    monkeypatch.setattr(target_logits, "linear_cross_entropy", spy)
    return calls


def test_target_only_defers_without_autograd_and_projects_with_it(monkeypatch):
    model = tiny_models.wrap("llama", dtype=torch.float64)
    batch = model.encode(tiny_models.samples("llama", 2))
    inputs = dict(batch.inputs)
    for grad, kind in ((False, DeferredLogits), (True, torch.Tensor)):
        with torch.set_grad_enabled(grad), target_only(model, batch.labels) as head:
            logits = model.hf(**inputs, use_cache=False).logits
        assert head.compact and type(logits) is kind
        assert logits.shape == (int((batch.labels != IGNORE).sum()), model.hf.config.vocab_size)
    with torch.no_grad(), target_only(model, batch.labels) as head:
        deferred = model.hf(**inputs, use_cache=False).logits
        calls = _fused_calls(monkeypatch)
        fused = target_losses(deferred, batch.labels, head.compact)
    assert calls, "the deferred logits did not take the fused loss"
    full = model.forward(batch).logits.double()
    scored = batch.labels != IGNORE
    nll = torch.nn.functional.cross_entropy(full[scored], batch.labels[scored], reduction="none")
    want = torch.zeros(batch.size, dtype=torch.float64).index_add_(0, scored.nonzero()[:, 0], nll)
    torch.testing.assert_close(fused, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "llava", "t5"])
def test_scan_with_the_fused_loss_in_small_tiles_equals_naive_loop(monkeypatch, family):
    monkeypatch.setattr(target_logits, "ROW_TILE", 3)
    monkeypatch.setattr(target_logits, "VOCAB_TILE", 5)
    calls = _fused_calls(monkeypatch)
    model = tiny_models.wrap(family, dtype=torch.float64)
    samples = tiny_models.samples(family, 3)
    result = scan(
        model,
        samples,
        unit="mid",
        targets="given",
        batch_size=2,
        max_batch_tokens=64,
        progress=False,
    )
    assert calls, "the scan did not take the fused loss"
    for name in result.sites:
        want = naive_deltas(model, samples, model.site(name), batch_size=2)
        _assert_close_relative(result[name], want)


def _assert_estimate_close(got, want):
    # Norms run in float32 inside the float64 models, so the backward of a loss scaled per
    # sample rounds differently from one scaled once: close to 1e-5 relative, and to 1e-6 of
    # the site's largest estimate for entries that nearly cancel.
    atol = 1e-6 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


def _encoded(model, samples, batch_size=2):
    return [model.encode(chunk) for chunk in batches(samples, batch_size)]


@pytest.mark.parametrize("family", ["llama", "llava", "t5", "gpt2"])
@pytest.mark.parametrize("unit", ["out", "mid"])
def test_estimate_and_can_from_one_backward_equal_the_two_passes(family, unit):
    model = tiny_models.wrap(family, dtype=torch.float64)
    samples = tiny_models.samples(family, 3)
    encoded = _encoded(model, samples)
    counts = torch.cat([(b.labels != IGNORE).sum(1) for b in encoded])
    # Samples of different target lengths weigh differently in the two losses.
    assert len(set(counts.tolist())) > 1
    sites = model.sites(unit)
    normalizer = float(counts.sum())
    want_estimate = first_order(model, encoded, sites, normalizer)
    estimate, can = estimate_and_can(model, encoded, sites, normalizer, alpha=0.5)
    scores = canfast.score(
        model,
        samples,
        alpha=0.5,
        unit=unit,
        sites=[s.name for s in sites],
        targets="given",
        batch_size=2,
        path="hooks",
        progress=False,
    )
    for site in sites:
        _assert_estimate_close(estimate[site.name], want_estimate[site.name])
        assert can[site.name].dtype == torch.float32
        torch.testing.assert_close(can[site.name], scores[site.name], rtol=1e-5, atol=1e-7)


def test_estimate_and_can_with_a_custom_objective():
    model = tiny_models.wrap("llama", dtype=torch.float64)
    samples = tiny_models.samples("llama", 3)
    encoded = _encoded(model, samples)
    sites = model.sites("out")

    def first_logit(outputs, batch):
        return outputs.logits[:, 0, :3].double().pow(2).sum(-1)

    want = first_order(model, encoded, sites, 3.0, first_logit)
    estimate, can = estimate_and_can(model, encoded, sites, 3.0, 0.25, first_logit)
    scores = canfast.score(
        model,
        samples,
        alpha=0.25,
        sites=[s.name for s in sites],
        targets="given",
        batch_size=2,
        objective=first_logit,
        path="hooks",
        progress=False,
    )
    for site in sites:
        _assert_estimate_close(estimate[site.name], want[site.name])
        torch.testing.assert_close(can[site.name], scores[site.name], rtol=1e-5, atol=1e-7)


def test_estimate_and_can_refuse_a_loss_without_gradient():
    model = tiny_models.wrap("llama", dtype=torch.float64)
    encoded = _encoded(model, tiny_models.samples("llama", 2))
    with pytest.raises(BadInput):
        estimate_and_can(
            model,
            encoded,
            model.sites("out"),
            2.0,
            0.5,
            lambda outputs, batch: outputs.logits[:, 0, 0] * 0,
        )


@pytest.mark.parametrize("op", ["add", "sub", "mul"])
def test_tiled_outputs_broadcast_in_elementwise_operations_without_copying(op):
    g = torch.Generator().manual_seed(3)
    source = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    other_source = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    dense = torch.randn(10, 3, 4, generator=g, dtype=torch.float64)
    fn = getattr(torch, op)
    kwargs = {"alpha": 0.5} if op != "mul" else {}
    full = source.repeat(5, 1, 1)
    other_full = other_source.repeat(5, 1, 1)
    for left, right, want in (
        (lambda: prefix._Tiled(source, 5), lambda: dense, fn(full, dense, **kwargs)),
        (lambda: dense, lambda: prefix._Tiled(source, 5), fn(dense, full, **kwargs)),
        (
            lambda: prefix._Tiled(source, 5),
            lambda: prefix._Tiled(other_source, 5),
            fn(full, other_full, **kwargs),
        ),
    ):
        a, b = left(), right()
        got = fn(a, b, **kwargs)
        assert torch.equal(got, want)
        for operand in (a, b):
            assert not isinstance(operand, prefix._Tiled) or operand.full is None
    # The sum of two tiled tensors stays tiled, and reads as the dense sum.
    both = prefix._Tiled(source, 5) + prefix._Tiled(other_source, 5)
    assert isinstance(both, prefix._Tiled)
    assert torch.equal(both * 1.0, full + other_full)
    # A broadcast that does not fit (another dtype) takes the dense path, with the same result.
    assert torch.equal(prefix._Tiled(source, 5) + dense.float(), full + dense.float())


def test_scan_of_a_later_layer_broadcasts_the_residual_and_equals_naive_loop(monkeypatch):
    taken = []
    real = prefix._broadcast_elementwise

    def spy(*args):
        result = real(*args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(prefix, "_broadcast_elementwise", spy)
    model = tiny_models.wrap("llama", dtype=torch.float64)
    samples = tiny_models.samples("llama", 3)
    name = "language.1.down"
    result = scan(model, samples, sites=name, targets="given", batch_size=2, progress=False)
    assert any(taken), "the replay did not broadcast a tiled residual"
    _assert_close_relative(result[name], naive_deltas(model, samples, model.site(name), 2))


@pytest.mark.parametrize("family", ["gemma2", "qwen2_moe"])
def test_target_losses_follow_what_the_model_does_to_its_logits(monkeypatch, family):
    """Gemma 2 soft-caps its logits: the deferred logits compute themselves for it and the loss
    reads the capped numbers; a mixture of experts defers as a plain model does."""
    model = tiny_models.wrap(family, dtype=torch.float64)
    batch = model.encode(tiny_models.samples(family, 3))
    capped = getattr(model.hf.config, "final_logit_softcapping", None)
    assert (capped is not None) == (family == "gemma2")
    calls = _fused_calls(monkeypatch)
    with torch.no_grad(), target_only(model, batch.labels) as head:
        outputs = model.hf(**dict(batch.inputs), use_cache=False)
        got = target_losses(outputs.logits, batch.labels, head.compact)
    assert bool(calls) == (capped is None)
    with torch.no_grad():
        full = model.forward(batch).logits.double()
    scored = batch.labels != IGNORE
    nll = torch.nn.functional.cross_entropy(full[scored], batch.labels[scored], reduction="none")
    want = torch.zeros(batch.size, dtype=torch.float64).index_add_(0, scored.nonzero()[:, 0], nll)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
