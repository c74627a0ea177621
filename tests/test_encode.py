"""``Model.encode``: which tokens are targets, labels aligned with logits, and right padding
that leaves every sample's loss as it is alone."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F

from canfast import BadInput, Sample
from canfast.model import IGNORE
from canfast.objective import generate_answers, mean_nll, token_nll

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_TOKENS = {"llava": tm.NUM_PATCHES, "instructblip": tm.NUM_QUERY_TOKENS}


@pytest.fixture(scope="module")
def models():
    return {family: tm.wrap(family) for family in tm.FAMILIES}


def target_ids(model, sample):
    """The target's ids, independently of canfast: one word-level token per word."""
    return model.tokenizer.convert_tokens_to_ids(sample.target.split())


def prompt_inputs(model, sample):
    """What the model's own processor makes of the prompt alone."""
    text = model.encoder.prompt_text(sample)
    if sample.image is not None:
        return model.processor(images=[sample.image], text=[text], return_tensors="pt")
    return model.tokenizer([text], return_tensors="pt")


@pytest.mark.parametrize("family", tm.CAUSAL_FAMILIES)
def test_causal_targets(models, family):
    model = models[family]
    tok = model.tokenizer
    samples = tm.samples(family, 4)
    batch = model.encode(samples)
    ids = batch.inputs["input_ids"]
    width = ids.shape[1]
    assert batch.labels.shape == batch.target_mask.shape == ids.shape
    assert batch.valid["language"].dtype == torch.bool
    for i, sample in enumerate(samples):
        prompt = prompt_inputs(model, sample)["input_ids"][0].tolist()
        target = [*target_ids(model, sample), tok.eos_token_id]
        assert tok.unk_token_id not in target
        full = prompt + target
        n = len(full)
        assert ids[i, :n].tolist() == full
        assert (ids[i, n:] == tok.pad_token_id).all()
        assert batch.inputs["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch.valid["language"][i].tolist() == [True] * n + [False] * (width - n)
        expected_mask = [len(prompt) <= t < n for t in range(width)]
        assert batch.target_mask[i].tolist() == expected_mask
        # Logit row t predicts token t + 1.
        expected_labels = [IGNORE] * width
        for t in range(len(prompt) - 1, n - 1):
            expected_labels[t] = full[t + 1]
        assert batch.labels[i].tolist() == expected_labels
        if family in IMAGE_TOKENS:
            image_id = model.hf.config.image_token_id
            assert prompt.count(image_id) == IMAGE_TOKENS[family]
            assert image_id not in target


def test_seq2seq_targets(models):
    model = models["t5"]
    tok = model.tokenizer
    samples = tm.samples("t5", 4)
    batch = model.encode(samples)
    width = max(len(target_ids(model, s)) + 1 for s in samples)
    assert batch.labels.shape == (4, width)
    assert torch.equal(batch.inputs["labels"], batch.labels)
    for i, sample in enumerate(samples):
        prompt = tok([sample.prompt])["input_ids"][0]
        n_prompt = len(prompt)
        assert batch.inputs["input_ids"][i, :n_prompt].tolist() == prompt
        assert batch.inputs["attention_mask"][i].sum() == n_prompt
        target = [*target_ids(model, sample), tok.eos_token_id]
        n = len(target)
        assert batch.labels[i].tolist() == target + [IGNORE] * (width - n)
        assert batch.target_mask[i].tolist() == [True] * n + [False] * (width - n)
    assert torch.equal(batch.valid["decoder"], batch.target_mask)
    assert torch.equal(batch.valid["language"], batch.inputs["attention_mask"].bool())


def test_masked_lm_targets(models):
    model = models["bert"]
    tok = model.tokenizer
    samples = tm.samples("bert", 3)
    batch = model.encode(samples)
    ids = batch.inputs["input_ids"]
    for i, sample in enumerate(samples):
        alone = tok([sample.prompt])["input_ids"][0]
        n = len(alone)
        assert ids[i, :n].tolist() == alone
        where = [t for t, token in enumerate(alone) if token == tok.mask_token_id]
        assert len(where) == len(sample.target.split()) >= 1
        assert batch.target_mask[i].nonzero().flatten().tolist() == where
        fills = dict(zip(where, target_ids(model, sample)))
        expected = [fills.get(t, IGNORE) for t in range(ids.shape[1])]
        assert batch.labels[i].tolist() == expected
    with pytest.raises(BadInput, match="mask tokens"):
        model.encode([Sample(None, "the [MASK] is red", "square big")])


def test_encode_needs_targets_and_images(models):
    # No sample with a target (an objective that needs none): the inputs alone, nothing scored.
    batch = models["llama"].encode([Sample(None, "what is it ?")])
    assert not batch.target_mask.any() and bool((batch.labels == IGNORE).all())
    with pytest.raises(BadInput, match="1 of 2 samples have no target"):
        models["llama"].encode([Sample(None, "what is it ?"), Sample(None, "a", "red")])
    with pytest.raises(BadInput, match="needs an image"):
        models["llava"].encode([Sample(None, "what is it ?", "red")])


def test_a_prompt_of_no_tokens_is_refused_before_generation(models):
    """GPT-2's tokenizer adds no BOS, so an empty prompt is no tokens: nothing to generate from
    (transformers failed on it with an IndexError); one beside it in a batch is refused too."""
    gpt2 = models["gpt2"]
    with pytest.raises(BadInput, match="prompt '' is no tokens"):
        gpt2.encode_prompts([Sample(None, "what is it ?"), Sample(None, "")])
    with pytest.raises(BadInput, match="prompt '' is no tokens"):
        generate_answers(gpt2, [Sample(None, "")], max_new_tokens=2, batch_size=1)
    assert gpt2.encode_prompts([Sample(None, "what is it ?")])["input_ids"].shape[1] > 0


def reference_nll(model, sample) -> float:
    """Mean NLL of the sample's targets computed alone, from the model's logits and labels built
    here: the last ``len(target) + 1`` tokens are the target and EOS (decoder models), the
    decoder sequence (encoder-decoders), the filled mask tokens (masked LMs)."""
    tok = model.tokenizer
    wanted = torch.tensor(target_ids(model, sample))
    inputs = dict(prompt_inputs(model, sample))
    if model.task == "masked":
        logits = model.hf(**inputs).logits[0]
        rows = logits[inputs["input_ids"][0] == tok.mask_token_id]
        return F.cross_entropy(rows.double(), wanted).item()
    wanted = torch.cat([wanted, torch.tensor([tok.eos_token_id])])
    if model.task == "seq2seq":
        logits = model.hf(**inputs, labels=wanted[None]).logits[0]
        return F.cross_entropy(logits.double(), wanted).item()
    inputs["input_ids"] = torch.cat([inputs["input_ids"], wanted[None]], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    logits = model.hf(**inputs).logits[0]
    n = len(wanted)
    return F.cross_entropy(logits[-n - 1 : -1].double(), wanted).item()


@pytest.mark.parametrize("family", tm.FAMILIES)
@torch.no_grad()
def test_padding_leaves_losses_unchanged(models, family):
    """Batched, right-padded per-sample NLL equals each sample's NLL computed alone, which is
    computed from the logits with labels built independently of ``encode``."""
    model = models[family]
    samples = tm.samples(family, 4 if family != "bert" else 3)
    batch = model.encode(samples)
    outputs = model.forward(batch)
    assert outputs.logits.shape[:2] == batch.labels.shape
    batched = mean_nll(outputs, batch)
    alone = torch.cat(
        [mean_nll(model.forward(model.encode([s])), model.encode([s])) for s in samples]
    )
    reference = torch.tensor([reference_nll(model, s) for s in samples], dtype=torch.float32)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    # The lengths differ, so there was padding to ignore.
    lengths = batch.valid.get("decoder", batch.valid["language"]).sum(1)
    assert len(set(lengths.tolist())) > 1
    # Sanity: losses are those of an untrained model, not zero.
    assert (batched > 1).all()


def test_token_nll_counts_targets(models):
    model = models["llama"]
    samples = tm.samples("llama", 3)
    batch = model.encode(samples)
    with torch.no_grad():
        total, count = token_nll(model.forward(batch).logits, batch.labels)
    assert count.tolist() == [len(s.target.split()) + 1 for s in samples]
    assert count.tolist() == batch.target_mask.sum(1).tolist()
    assert total.dtype == torch.float32 and (total > 0).all()


def test_batch_repeat_and_to(models):
    batch = models["llava"].encode(tm.samples("llava", 2))
    assert batch.repeat(1) is batch
    tripled = batch.repeat(3)
    assert tripled.size == 6
    for key, value in batch.inputs.items():
        for block in range(3):
            assert torch.equal(tripled.inputs[key][2 * block : 2 * block + 2], value)
    assert torch.equal(tripled.labels[4:], batch.labels)
    assert torch.equal(tripled.valid["language"][2:4], batch.valid["language"])
    moved = batch.to("cpu")
    assert torch.equal(moved.target_mask, batch.target_mask)


def test_instructblip_qformer_text_is_right_padded(models):
    """The Q-Former reads its text after the query tokens with absolute positions: its text is
    padded on the right with its own pad id, even in left-padded prompts for generation."""
    model = models["instructblip"]
    qtok = model.processor.qformer_tokenizer
    assert qtok.pad_token_id != model.tokenizer.pad_token_id
    samples = tm.samples("instructblip", 3)
    for inputs in (model.encode(samples).inputs, model.encode_prompts(samples)):
        ids, mask = inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
        for i, sample in enumerate(samples):
            alone = qtok([sample.prompt])["input_ids"][0]
            n = len(alone)
            assert ids[i, :n].tolist() == alone
            assert (ids[i, n:] == qtok.pad_token_id).all()
            assert mask[i].tolist() == [1] * n + [0] * (ids.shape[1] - n)
        assert len(set(mask.sum(1).tolist())) > 1
    # The language prompt is left-padded for generation.
    prompts = model.encode_prompts(samples)
    lengths = prompts["attention_mask"].sum(1)
    width = prompts["input_ids"].shape[1]
    for i, n in enumerate(lengths.tolist()):
        assert prompts["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_batched_generation_equals_one_by_one(models, family):
    """Greedy answers do not depend on the other prompts of a batch (left padding for decoder
    models, right padding for encoders)."""
    model = models[family]
    samples = tm.samples(family, 3)
    together = generate_answers(model, samples, max_new_tokens=4, batch_size=3)
    alone = [generate_answers(model, [s], max_new_tokens=4)[0] for s in samples]
    assert together == alone


# ----- targets scored exactly as written ---------------------------------------------------------

CORPUS = ["count : one two . three four .", "count :\none two .", "one two three four five ."]


def trained(model, pre_tokenizer, decoder, trainer, normalizer=None):
    """A ``tokenizers`` tokenizer trained offline on the corpus above."""
    from tokenizers import Tokenizer

    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def byte_level_bpe():
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=alphabet, show_progress=False
    )
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return trained(models.BPE(), pre, decoders.ByteLevel(), trainer)


def sentencepiece():
    from tokenizers import decoders, models, pre_tokenizers, trainers

    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "</s>"], show_progress=False
    )
    model = models.BPE(unk_token="<unk>")
    return trained(model, pre_tokenizers.Metaspace(), decoders.Metaspace(), trainer)


def wordpiece():
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    trainer = trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[PAD]", "</s>"], show_progress=False
    )
    model = models.WordPiece(unk_token="[UNK]")
    pre = pre_tokenizers.BertPreTokenizer()
    return trained(model, pre, decoders.WordPiece(), trainer, normalizers.BertNormalizer())


TOKENIZERS = {
    "byte-level-bpe": byte_level_bpe,
    "sentencepiece": sentencepiece,
    "wordpiece": wordpiece,
}
# (prompt, target) -> the target's tokens, for each tokenizer. A byte-level BPE keeps a space in
# the token that follows it, SentencePiece marks a word start with '▁', WordPiece drops spaces.
EXPECTED = {
    ("count : ", "one two ."): {
        "byte-level-bpe": ["Ġone", "Ġtwo", "Ġ."],
        "sentencepiece": ["▁one", "▁two", "▁."],
        "wordpiece": ["one", "two", "."],
    },
    ("count :\n", "one two ."): {
        "byte-level-bpe": ["one", "Ġtwo", "Ġ."],
        # Metaspace splits only at spaces: the token that straddles the boundary is scored.
        "sentencepiece": ["▁:\none", "▁two", "▁."],
        "wordpiece": ["one", "two", "."],
    },
    ("count :", "one two ."): {
        "byte-level-bpe": ["Ġone", "Ġtwo", "Ġ."],
        "sentencepiece": ["▁one", "▁two", "▁."],
        "wordpiece": ["one", "two", "."],
    },
    ("", "count : one two ."): {
        "byte-level-bpe": ["count", "Ġ:", "Ġone", "Ġtwo", "Ġ."],
        "sentencepiece": ["▁count", "▁:", "▁one", "▁two", "▁."],
        "wordpiece": ["count", ":", "one", "two", "."],
    },
}


@pytest.fixture(scope="module")
def gpt2_body():
    return tm.build("gpt2")


@pytest.mark.parametrize("kind", list(TOKENIZERS))
@pytest.mark.parametrize("case", list(EXPECTED), ids=repr)
def test_targets_are_scored_exactly_as_written(gpt2_body, kind, case):
    from transformers import PreTrainedTokenizerFast

    from canfast import Model

    tok = PreTrainedTokenizerFast(tokenizer_object=TOKENIZERS[kind](), eos_token="</s>")
    model = Model(gpt2_body[0], tok)
    prompt, target = case
    text = model.encoder.prompt_text(Sample(None, prompt, target))
    assert text == prompt
    joined = model.encoder.join(text, target)
    assert joined == (prompt + " " + target if prompt == "count :" else prompt + target)

    batch = model.encode([Sample(None, prompt, target)])
    ids = batch.inputs["input_ids"][0].tolist()
    scored = [t for t in batch.labels[0].tolist() if t != IGNORE]
    # Nothing (no prompt, no BOS) precedes the first token of an empty prompt's target: no
    # logit predicts it.
    expected = EXPECTED[case][kind][0 if prompt else 1 :]
    assert tok.convert_ids_to_tokens(scored) == [*expected, "</s>"]
    # The model reads the joined text, tokenized whole, and exactly that text.
    assert ids == tok(joined)["input_ids"] + [tok.eos_token_id]
    assert scored == ids[len(ids) - len(scored) :]

    model.score_eos = False
    without = model.encode([Sample(None, prompt, target)])
    unscored = [t for t in without.labels[0].tolist() if t != IGNORE]
    assert tok.convert_ids_to_tokens(unscored) == expected
