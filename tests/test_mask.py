"""Masking: hooks and zeroed weights agree with each other and with a hand-edited copy, the
model comes back exactly, and a batch of masks gives each block its own mask."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch

from canfast import BadInput, NeuronSet, masked, ops
from canfast.objective import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

# The torch reference, and the compiled CPU kernels when they are built. (Triton is tested on
# the ops themselves: its CPU interpreter is too slow for whole models.)
BACKENDS = ["torch"] + (["cpp"] if ops.available("cpp") else [])


def pick(model, unit: str, per_site: int = 3, seed: int = 0) -> NeuronSet:
    """A few random channels of every site of ``unit``."""
    generator = torch.Generator().manual_seed(seed)
    neurons = []
    for site in model.all_sites(unit):
        channels = torch.randperm(site.channels, generator=generator)[:per_site]
        neurons += [(site.name, int(c)) for c in channels]
    return NeuronSet(tuple(neurons))


@torch.no_grad()
def logits(model, batch):
    return model.forward(batch).logits.clone()


@torch.no_grad()
def zeroed_copy(model, neurons: NeuronSet):
    """A deep copy of the HF model with the neurons' weights zeroed by hand: for unit ``out``
    the output channel's weight row and bias entry, for unit ``mid`` the down projection's
    input column. GPT-2's Conv1D stores its weight as [in, out]."""
    hf = copy.deepcopy(model.hf)
    for site_name, channel in neurons:
        site = model.site(site_name)
        module = hf.get_submodule(site.module_path)
        conv1d = type(module).__name__ == "Conv1D"
        if site.unit == "out":
            if conv1d:
                module.weight[:, channel] = 0
            else:
                module.weight[channel, :] = 0
            if module.bias is not None:
                module.bias[channel] = 0
        elif conv1d:
            module.weight[channel, :] = 0
        else:
            module.weight[:, channel] = 0
    return hf


def snapshot(model):
    return {k: v.clone() for k, v in model.hf.state_dict().items()}


def assert_restored(model, before, reference_logits, batch):
    after = model.hf.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    for site in model.all_sites("out"):
        assert "forward" not in vars(site.module)
    assert torch.equal(logits(model, batch), reference_logits)


@pytest.fixture(scope="module")
def models():
    return {family: tm.wrap(family) for family in tm.FAMILIES}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("family", tm.FAMILIES)
def test_hook_weight_and_manual_agree(models, family, unit, backend):
    model = models[family]
    batch = model.encode(tm.samples(family, 3 if family == "bert" else 4))
    base = logits(model, batch)
    before = snapshot(model)
    neurons = pick(model, unit)

    with masked(model, neurons, mode="hook", backend=backend) as inside:
        assert inside is model
        hooked = logits(model, batch)
        # Hooks leave the weights alone.
        assert all(torch.equal(before[k], v) for k, v in model.hf.state_dict().items())
    assert_restored(model, before, base, batch)

    with masked(model, neurons, mode="weight"):
        weighted = logits(model, batch)
    assert_restored(model, before, base, batch)

    manual = zeroed_copy(model, neurons)
    with torch.no_grad():
        expected = manual(**batch.inputs, use_cache=False).logits

    torch.testing.assert_close(hooked, weighted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-5)
    # The mask matters: the outputs moved well beyond rounding.
    assert (hooked - base).abs().max() > 1e-2


def test_masked_channel_is_zero(models):
    """Inside the mask a masked output channel is exactly zero at every position."""
    model = models["gpt2"]
    batch = model.encode(tm.samples("gpt2", 2))
    site = model.site("language.0.up")
    seen = {}
    handle = site.module.register_forward_hook(lambda m, a, out: seen.update(y=out.detach()))
    try:
        for mode in ("hook", "weight"):
            with masked(model, ["language.0.up:5", "language.0.up:17"], mode=mode):
                logits(model, batch)
            assert (seen["y"][..., [5, 17]] == 0).all(), mode
            assert (seen["y"][..., 6] != 0).any()
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["hook", "weight"])
def test_restored_after_an_error(models, mode):
    model = models["llava"]
    batch = model.encode(tm.samples("llava", 2))
    base = logits(model, batch)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="inside"):
        with masked(model, pick(model, "out"), mode=mode):
            raise RuntimeError("inside")
    assert_restored(model, before, base, batch)


def test_neuron_forms(models):
    model = models["llama"]
    batch = model.encode(tm.samples("llama", 2))
    ids = ["language.0.gate:3", "language.1.down:7"]
    results = []
    for form in (ids, NeuronSet.from_ids(ids), [("language.0.gate", 3), ("language.1.down", 7)]):
        with masked(model, form):
            results.append(logits(model, batch))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    base = logits(model, batch)
    with masked(model, NeuronSet(())):
        assert torch.equal(logits(model, batch), base)
    assert not torch.equal(results[0], base)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("family", ["llava", "instructblip", "gpt2", "opt", "t5", "bert"])
def test_batch_of_masks(models, family, unit, backend):
    model = models[family]
    samples = tm.samples(family, 3)
    batch = model.encode(samples)
    first = pick(model, unit, per_site=4, seed=1)
    # The second set touches only some of the sites of the first, the third none.
    second = NeuronSet(pick(model, unit, per_site=2, seed=2).neurons[::2])
    sets = [first, NeuronSet(()), second]
    alone = []
    for neurons in sets:
        with masked(model, neurons, backend="torch"):
            alone.append(logits(model, batch))
    base = logits(model, batch)
    assert torch.equal(alone[1], base)
    with masked(model, sets, backend=backend):
        stacked = logits(model, batch.repeat(3))
    n = batch.size
    for m in range(3):
        torch.testing.assert_close(stacked[m * n : (m + 1) * n], alone[m], rtol=1e-5, atol=1e-5)
    assert (alone[0] - alone[2]).abs().max() > 1e-2


def test_batch_of_masks_in_evaluate(models):
    """``evaluate(masks=M)`` under a batch of masks gives each set's own totals."""
    model = models["llava"]
    samples = tm.samples("llava", 3)
    sets = [pick(model, "out", 2, seed=s) for s in range(3)]
    together = None
    with masked(model, sets):
        together = evaluate(model, samples, batch_size=2, masks=3)
    for neurons, result in zip(sets, together):
        with masked(model, neurons):
            (single,) = evaluate(model, samples, batch_size=2)
        assert result.tokens == single.tokens
        assert result.nll == pytest.approx(single.nll, rel=1e-5)


def test_mask_errors(models):
    model = models["llava"]
    with pytest.raises(BadInput, match="mode"):
        with masked(model, ["language.0.up:1"], mode="zero"):
            pass
    with pytest.raises(BadInput, match="channels"):
        with masked(model, ["language.0.down:16"]):
            pass
    with pytest.raises(BadInput, match="no site named"):
        with masked(model, ["language.9.down:1"]):
            pass
    with pytest.raises(BadInput, match="unit"):
        with masked(model, ["language.0.mid:1"], unit="out"):
            pass
    with pytest.raises(BadInput, match="hook"):
        with masked(model, [NeuronSet.from_ids(["vision.0.up:1"])] * 2, mode="weight"):
            pass
    with pytest.raises(BadInput, match="bad neuron id"):
        with masked(model, ["language.0.up"]):
            pass
    # Nothing stayed installed after the refusals.
    for site in model.all_sites("out"):
        assert "forward" not in vars(site.module)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["hook", "weight"])
def test_out_and_mid_neurons_of_one_down_projection(models, family, mode):
    """``.down`` (its outputs) and ``.mid`` (its inputs) neurons share one module."""
    model = models[family]
    batch = model.encode(tm.samples(family, 2))
    base = logits(model, batch)
    before = snapshot(model)
    neurons = NeuronSet.from_ids(
        ["language.0.down:1", "language.0.mid:2", "language.0.mid:9", "language.1.down:4"]
    )
    with masked(model, neurons, mode=mode):
        got = logits(model, batch)
    assert_restored(model, before, base, batch)
    with torch.no_grad():
        expected = zeroed_copy(model, neurons)(**batch.inputs, use_cache=False).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with masked(model, neurons[:1], mode=mode):
        only_out = logits(model, batch)
    assert (got - only_out).abs().max() > 1e-3


@pytest.mark.parametrize("inner_mode", ["hook", "weight"])
@pytest.mark.parametrize("outer_mode", ["hook", "weight"])
def test_nested_masks_combine(models, outer_mode, inner_mode):
    """A ``masked`` inside another masks both sets; leaving each restores the state before."""
    model = models["llava"]
    batch = model.encode(tm.samples("llava", 2))
    base = logits(model, batch)
    before = snapshot(model)
    outer = NeuronSet.from_ids(["language.0.up:1", "language.1.down:2", "vision.0.mid:3"])
    # Overlaps the outer set's sites, and one neuron of it.
    inner = NeuronSet.from_ids(["language.0.up:5", "language.1.down:2", "projector.0.up:0"])
    with masked(model, outer, mode="weight"):
        outer_alone = logits(model, batch)
    with masked(model, NeuronSet(outer.neurons + inner.neurons), mode="weight"):
        union = logits(model, batch)
    with masked(model, outer, mode=outer_mode):
        with masked(model, inner, mode=inner_mode):
            nested = logits(model, batch)
        after_inner = logits(model, batch)
    assert_restored(model, before, base, batch)
    torch.testing.assert_close(nested, union, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after_inner, outer_alone, rtol=1e-5, atol=1e-5)
    assert (union - outer_alone).abs().max() > 1e-3


def test_nested_batches_of_masks(models):
    model = models["llama"]
    batch = model.encode(tm.samples("llama", 2))
    base = logits(model, batch)
    before = snapshot(model)
    sets = [NeuronSet.from_ids(["language.0.up:1"]), NeuronSet.from_ids(["language.0.up:2"])]
    fixed = NeuronSet.from_ids(["language.0.up:3"])
    with masked(model, fixed):
        with masked(model, sets):
            stacked = logits(model, batch.repeat(2))
    for m, neurons in enumerate(sets):
        with masked(model, NeuronSet(fixed.neurons + neurons.neurons)):
            alone = logits(model, batch)
        torch.testing.assert_close(stacked[2 * m : 2 * m + 2], alone, rtol=1e-5, atol=1e-5)
    with masked(model, sets):
        with pytest.raises(BadInput, match="differ in size"):
            with masked(model, sets * 2):
                pass
        # The refused inner mask left the outer one in place.
        still = logits(model, batch.repeat(2))
    torch.testing.assert_close(still, logits_of_sets(model, batch, sets), rtol=1e-5, atol=1e-5)
    assert_restored(model, before, base, batch)


def logits_of_sets(model, batch, sets):
    with masked(model, sets):
        return logits(model, batch.repeat(len(sets)))


@pytest.mark.parametrize("family", ["opt", "gpt2"])  # a Linear with a bias; a Conv1D
def test_route_follows_its_weight(models, family):
    """A routed layer checks its weight once (``ops.LinearPlan``) and follows it afterwards: a
    weight replaced or cast (``param.data = ...``) and a weight written in place are what the
    next call uses, as an unrouted layer would."""
    model = models[family]
    site = model.site("language.0.up")
    module = site.module
    saved = module.weight.detach().clone()
    x = torch.randn(2, 3, saved.shape[0] if site.transposed else saved.shape[1])
    keep = torch.ones(site.channels)
    keep[[5, 17]] = 0

    def expected() -> torch.Tensor:
        weight = module.weight.t() if site.transposed else module.weight
        return torch.nn.functional.linear(x, weight, module.bias) * keep

    try:
        with torch.no_grad(), masked(model, ["language.0.up:5", "language.0.up:17"]):
            torch.testing.assert_close(module(x), expected(), rtol=0, atol=0)
            module.weight.data = module.weight.data * 2  # new storage
            torch.testing.assert_close(module(x), expected(), rtol=0, atol=0)
            module.weight.mul_(-0.5)  # in place
            torch.testing.assert_close(module(x), expected(), rtol=0, atol=0)
            moved = module.weight.data.double()  # another dtype: the plan is made again
            module.weight.data = moved
            y = module(x.double())
            assert y.dtype == torch.float64
            assert (y[..., [5, 17]] == 0).all() and (y[..., 6] != 0).any()
    finally:
        module.weight.data = saved
    assert "forward" not in vars(module)
