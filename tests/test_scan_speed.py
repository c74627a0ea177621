"""The scan's speed paths against their plain counterparts: the vocabulary projection fused with
the loss (target_logits), and the first-order estimate and CAN from one backward
(first_order)."""

from __future__ import annotations

import pytest
import torch

from canfast import target_logits
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
