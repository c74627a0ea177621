"""Inputs canfast must refuse, or take without a trap: checkpoints without the head they are
scored with, broken or pickle-only weights, devices that are not there, data files that are not
what they claim; and the objectives for sentence encoders (canfast.objectives).

Models are tiny BERTs saved with ``save_pretrained`` into a temporary directory, with a
tokenizer built offline.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import canfast
from canfast.data import Sample, load_jsonl
from canfast.errors import BadInput
from canfast.objectives import contrastive, embedding_drift, sentence_embedding

sys.path.insert(0, str(Path(__file__).parent))
import tiny_models  # noqa: E402
from test_cli import error_line as assert_bad_input  # noqa: E402
from test_cli import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENTENCES = [
    "what color is the square ?",
    "the square is red .",
    "a big blue circle on the left",
    "a blue circle on the left .",
    "two small green triangles",
    "green triangles in the picture",
    "is there a star in the image ?",
    "no star in the picture .",
]


def bert_config(tok):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tok.pad_token_id,
    )


def save_bert(path: Path, head: bool, seed: int = 0) -> Path:
    """A tiny BERT saved as a user's checkpoint: ``BertForMaskedLM`` (``head``) or a sentence
    encoder's bare ``BertModel``."""
    from transformers import BertForMaskedLM, BertModel

    tok = tiny_models.tokenizer("bert")
    torch.manual_seed(seed)
    model = (BertForMaskedLM if head else BertModel)(bert_config(tok))
    tiny_models.roughen(model, seed)  # weights large enough for masking to show
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return save_bert(tmp_path_factory.mktemp("encoder") / "minilm", head=False)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory) -> Path:
    return save_bert(tmp_path_factory.mktemp("mlm") / "bert", head=True)


# ----- item 1: a checkpoint without the head is never scored with a random one --------------


def test_a_checkpoint_without_the_head_is_refused(encoder_dir):
    with pytest.raises(BadInput, match=r"no weights for .*cls\.predictions.*--task base"):
        canfast.load(str(encoder_dir))


def test_the_base_model_loads_when_asked(encoder_dir):
    from transformers import BertModel

    model = canfast.load(str(encoder_dir), task="base")
    assert type(model.hf) is BertModel
    assert model.task == "base"
    # The checkpoint's weights, and no random pooler left behind (it was saved, so it stays).
    saved = BertModel.from_pretrained(encoder_dir)
    for (name, a), (_, b) in zip(model.hf.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_base_model_without_a_saved_pooler_drops_it(mlm_dir):
    # A masked-LM checkpoint has no pooler: loaded bare, the pooler would be random.
    model = canfast.load(str(mlm_dir), task="base")
    assert model.hf.pooler is None
    batch = model.encode([Sample(None, "the square is red .")])
    assert model.forward(batch).pooler_output is None


def test_a_checkpoint_with_its_head_loads_as_before(mlm_dir):
    model = canfast.load(str(mlm_dir))
    assert model.task == "masked"


def test_scoring_a_base_model_without_an_objective_says_what_to_do(encoder_dir):
    model = canfast.load(str(encoder_dir), task="base")
    with pytest.raises(BadInput, match="objective="):
        canfast.score(model, [Sample(None, s) for s in SENTENCES[:2]], progress=False)


def test_unknown_task_is_refused(mlm_dir):
    with pytest.raises(BadInput, match="task"):
        canfast.load(str(mlm_dir), task="head")


# ----- weights and model paths ---------------------------------------------------------------


def test_a_truncated_safetensors_file_is_bad_input(tmp_path):
    path = save_bert(tmp_path / "bert", head=True)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(BadInput, match="safetensors"):
        canfast.load(str(path))


def test_a_model_directory_without_weights_is_bad_input(tmp_path):
    path = save_bert(tmp_path / "bert", head=True)
    (path / "model.safetensors").unlink()
    with pytest.raises(BadInput, match="no weights"):
        canfast.load(str(path))


def test_a_pickle_only_checkpoint_needs_allow_pickle(tmp_path):
    path = save_bert(tmp_path / "bert", head=True)
    state = canfast.load(str(path)).hf.state_dict()
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(BadInput, match="allow-pickle"):
        canfast.load(str(path))
    model = canfast.load(str(path), allow_pickle=True)
    assert torch.equal(model.hf.state_dict()["cls.predictions.bias"], state["cls.predictions.bias"])


@pytest.mark.parametrize(
    "name", ["./no/such/model", "~/no-such-model-dir-canfast", "/no/such/model", "{tmp}/missing"]
)
def test_a_local_looking_model_path_that_does_not_exist_fails_at_once(tmp_path, name):
    with pytest.raises(BadInput, match="model not found"):
        canfast.load(name.format(tmp=tmp_path))


def test_a_missing_model_under_an_existing_folder_is_local(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match="model not found"):
        canfast.load("models/minilm")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_bad_input():
    with pytest.raises(BadInput, match="CUDA is not available"):
        canfast.load("builtin:tiny-llava", device="cuda")


def test_an_unknown_device_is_bad_input():
    with pytest.raises(BadInput, match="unknown device"):
        canfast.load("builtin:tiny-llava", device="gpu0")


# ----- objectives for sentence encoders ------------------------------------------------------


def reference_contrastive(embedding: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE written out row by row in float64."""
    e = embedding.double()
    e = e / e.norm(dim=-1, keepdim=True)
    losses = []
    for i in range(e.shape[0]):
        partner = i + 1 if i % 2 == 0 else i - 1
        others = [j for j in range(e.shape[0]) if j != i]
        logits = torch.stack([e[i] @ e[j] / temperature for j in others])
        losses.append(-(logits[others.index(partner)] - torch.logsumexp(logits, 0)))
    return torch.stack(losses)


def test_contrastive_matches_the_loss_written_out(encoder_dir):
    model = canfast.load(str(encoder_dir), task="base")
    batch = model.encode([Sample(None, s) for s in SENTENCES])
    outputs = model.forward(batch)
    got = contrastive(outputs, batch, temperature=0.1)
    want = reference_contrastive(sentence_embedding(outputs, batch), 0.1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert got.shape == (len(SENTENCES),)
    # Identical embeddings (a collapsed encoder) give every row ln(B - 1).
    same = torch.ones(len(SENTENCES), 16)
    flat = reference_contrastive(same, 0.1)
    torch.testing.assert_close(flat, torch.full_like(flat, float(torch.log(torch.tensor(7.0)))))


def test_mean_pooling_ignores_padding(encoder_dir):
    model = canfast.load(str(encoder_dir), task="base")
    alone = model.encode([Sample(None, SENTENCES[1])])
    padded = model.encode([Sample(None, SENTENCES[1]), Sample(None, SENTENCES[2])])
    a = sentence_embedding(model.forward(alone), alone)[0]
    b = sentence_embedding(model.forward(padded), padded)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_contrastive_refuses_a_batch_that_splits_a_pair(encoder_dir):
    model = canfast.load(str(encoder_dir), task="base")
    batch = model.encode([Sample(None, s) for s in SENTENCES[:3]])
    with pytest.raises(BadInput, match="even"):
        contrastive(model.forward(batch), batch)


def test_embedding_drift_is_zero_unmasked_and_grows_with_masking(encoder_dir):
    model = canfast.load(str(encoder_dir), task="base")
    samples = [Sample(None, s) for s in SENTENCES]
    drift = embedding_drift(model, samples, batch_size=3)
    batch = model.encode(samples[2:6])  # other batches, other padding: keys still match
    assert float(drift(model.forward(batch), batch).abs().max()) < 1e-5
    every = canfast.NeuronSet.from_ids(
        [f"{site.name}:{j}" for site in model.sites(kinds=["up"]) for j in range(site.channels)]
    )
    with canfast.masked(model, every):
        moved = drift(model.forward(batch), batch)
    assert bool((moved > 1e-4).all()) and bool((moved <= 2).all())
    stacked = batch.repeat(3)
    assert drift(model.forward(stacked), stacked).shape == (12,)


def test_embedding_drift_refuses_samples_it_has_not_seen(encoder_dir):
    model = canfast.load(str(encoder_dir), task="base")
    drift = embedding_drift(model, [Sample(None, SENTENCES[0])])
    batch = model.encode([Sample(None, SENTENCES[1])])
    with pytest.raises(BadInput, match="unmasked embedding"):
        drift(model.forward(batch), batch)


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_sentence_encoder_example_runs(encoder_dir, monkeypatch, tmp_path):
    code = readme_block("### Sentence encoders")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in SENTENCES))
    code = code.replace('"models/all-MiniLM-L6-v2"', repr(str(encoder_dir)))
    code = code.replace('"pairs.jsonl"', repr(str(data)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    scores, result = namespace["scores"], namespace["result"]
    assert scores.meta["objective"] == "contrastive"
    assert sum(float(v.abs().sum()) for v in scores.values.values()) > 0
    assert result.ppl0 == pytest.approx(1.0, abs=1e-5)  # exp(mean drift) with no mask: 1


# ----- data files ----------------------------------------------------------------------------


def test_a_non_utf8_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(BadInput, match=r"data\.jsonl:2: not UTF-8"):
        load_jsonl(path)


@pytest.mark.parametrize("target", ["", "   ", "\n\t"])
def test_empty_or_whitespace_targets_are_refused(tmp_path, target):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p", "target": target}) + "\n")
    with pytest.raises(BadInput, match=r"data\.jsonl:1: .*empty"):
        load_jsonl(path)


def test_unknown_jsonl_keys_are_named_in_one_warning(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "a", "answer": "x", "label": 1}, {"prompt": "b", "answer": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning) as caught:
        samples = load_jsonl(path)
    assert len(samples) == 2
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "answer" in messages[0] and "label" in messages[0]


# ----- images: decoded lazily, one batch at a time -------------------------------------------


def write_png(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def test_jsonl_samples_keep_paths_not_pixels(tmp_path):
    write_png(tmp_path / "a.png", (32, 24))
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "a.png", "prompt": "p"}) + "\n")
    (sample,) = load_jsonl(path)
    assert isinstance(sample.image, Path)
    image = sample.load_image()
    assert image.size == (32, 24) and image.mode == "RGB"
    assert sample.load_image() is not image  # decoded afresh, never kept


def test_an_in_memory_image_still_works():
    picture = Image.new("RGB", (8, 8), "red")
    sample = Sample(picture, "p")
    assert sample.load_image() is picture


def test_large_images_are_reduced_to_what_the_processor_needs(tmp_path):
    write_png(tmp_path / "big.png", (900, 600))
    sample = Sample(tmp_path / "big.png", "p")
    image = sample.load_image(need=100)
    assert min(image.size) >= 200 and min(image.size) < 600
    assert image.size[0] / image.size[1] == pytest.approx(1.5, rel=0.02)
    assert sample.load_image(need=400).size == (900, 600)  # never reduced below 2x need


def test_an_image_over_the_decompression_limit_is_bad_input(tmp_path, monkeypatch):
    write_png(tmp_path / "bomb.png", (100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 80 * 80)
    with pytest.raises(BadInput, match=r"bomb\.png is 100x100 = 10000 pixels, over the.* limit"):
        Sample(tmp_path / "bomb.png", "p").load_image()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)  # where Pillow itself refuses
    with pytest.raises(BadInput, match=r"bomb\.png is over .* decoding limit"):
        Sample(tmp_path / "bomb.png", "p").load_image()


def test_a_missing_image_is_named_with_its_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "gone.png", "prompt": "p"}) + "\n")
    with pytest.raises(BadInput, match=r"data\.jsonl:1: image not found"):
        load_jsonl(path)


# ----- score files ---------------------------------------------------------------------------


def scores_file(path: Path, value: float, meta: dict[str, str]) -> Path:
    from canfast.io import save_tensors

    save_tensors(path, {"language.0.up": torch.tensor([1.0, value])}, meta)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_scores_file_with_nan_or_inf_is_refused(tmp_path, value):
    path = scores_file(tmp_path / "s.safetensors", value, {"model_fingerprint": "abc"})
    with pytest.raises(BadInput, match="language.0.up holds 1 NaN or infinite"):
        canfast.Scores.load(path)


def test_a_scores_file_without_a_model_fingerprint_is_refused(tmp_path):
    path = scores_file(tmp_path / "s.safetensors", 2.0, {"model": "x"})
    with pytest.raises(BadInput, match="no model fingerprint"):
        canfast.Scores.load(path)
    fine = scores_file(tmp_path / "t.safetensors", 2.0, {"model_fingerprint": "abc"})
    assert canfast.Scores.load(fine).meta["model_fingerprint"] == "abc"


def test_a_prompt_with_two_image_placeholders_is_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": "<image> what ?"}, {"prompt": "<image> and <image> ?"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadInput, match=r"data\.jsonl:2: the prompt has 2 image placeholders"):
        load_jsonl(path)


# ----- the command line: one line on stderr, exit 2, no traceback, nothing written -----------


def nothing_written(cwd: Path) -> bool:
    runs = cwd / "runs"
    return not runs.exists() or not any(runs.iterdir())


def broken_models(root: Path) -> dict[str, Path]:
    """Model directories a user might point canfast at by mistake."""
    good = save_bert(root / "good", head=True)
    made = {"encoder": save_bert(root / "encoder", head=False)}
    for name in ("truncated", "empty", "pickle"):
        shutil.copytree(good, root / name)
        made[name] = root / name
    weights = made["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (made["empty"] / "model.safetensors").unlink()
    (made["pickle"] / "model.safetensors").unlink()
    torch.save(canfast.load(str(good)).hf.state_dict(), made["pickle"] / "pytorch_model.bin")
    return made


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return broken_models(tmp_path_factory.mktemp("models"))


@pytest.mark.parametrize(
    ("which", "named"),
    [
        ("truncated", ["truncated", "safetensors"]),
        ("empty", ["empty", "no weights"]),
        ("pickle", ["pytorch_model.bin", "--allow-pickle"]),
        ("encoder", ["no weights for", "--task base"]),
        ("./no/such/model", ["model not found"]),
    ],
)
def test_cli_refuses_models_it_cannot_stand_behind(models, tmp_path, which, named):
    model = models.get(which, which)
    assert_bad_input(run_cli("sites", "--model", model, cwd=tmp_path), *named)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_device_cuda_without_cuda(tmp_path):
    result = run_cli("sites", "--device", "cuda", cwd=tmp_path)
    assert_bad_input(result, "cuda", "CUDA is not available")


DATA_FILES = {
    "latin1.jsonl": (b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n', ["latin1.jsonl:2", "UTF-8"]),
    "blank.jsonl": (b'{"prompt": "a", "target": "  "}\n', ["blank.jsonl:1", "empty"]),
    "two.jsonl": (b'{"prompt": "<image> <image> ?"}\n', ["two.jsonl:1", "placeholders"]),
}


@pytest.mark.parametrize("name", sorted(DATA_FILES))
def test_cli_refuses_bad_data_files_before_any_work(tmp_path, name):
    content, named = DATA_FILES[name]
    (tmp_path / name).write_bytes(content)
    result = run_cli("score", "--data", name, "--targets", "given", cwd=tmp_path)
    assert_bad_input(result, *named)
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("value", "meta", "named"),
    [
        (float("nan"), {"model_fingerprint": "x"}, ["NaN or infinite"]),
        (1.0, {"model": "builtin:tiny-llava"}, ["no model fingerprint"]),
    ],
)
def test_cli_refuses_score_files_it_cannot_trust(tmp_path, value, meta, named):
    scores_file(tmp_path / "scores.safetensors", value, meta)
    result = run_cli("sweep", "--scores", "scores.safetensors", "--limit", "2", cwd=tmp_path)
    assert_bad_input(result, "scores.safetensors", *named)
    assert nothing_written(tmp_path)


# ----- rankings that mean nothing are refused, ties are said -----------------------------------


def test_scoring_without_a_target_token_is_refused(tmp_path):
    # A masked LM whose prompts have no [MASK]: every score would be exactly 0.
    path = save_bert(tmp_path / "bert", head=True)
    model = canfast.load(str(path))
    samples = [Sample(None, s) for s in SENTENCES[:2]]
    with pytest.raises(BadInput, match="no sample has a target token"):
        canfast.score(model, samples, progress=False)


def test_a_loss_that_is_zero_everywhere_is_refused(encoder_dir):
    model = canfast.load(str(encoder_dir), task="base")

    def nothing(outputs, batch):
        return outputs.last_hidden_state.sum(dim=(1, 2)) * 0.0

    with pytest.raises(BadInput, match="loss is exactly 0"):
        canfast.score(
            model, [Sample(None, s) for s in SENTENCES[:2]], objective=nothing, progress=False
        )


def test_gradients_that_are_zero_at_every_site_are_refused(encoder_dir):
    model = canfast.load(str(encoder_dir), task="base")

    def embeddings_only(outputs, batch):
        # Depends on the input embeddings alone: no FFN site is on its path.
        return outputs.hidden_states[0].pow(2).mean(dim=(1, 2))

    model.hf.config.output_hidden_states = True
    with pytest.raises(BadInput, match="every gradient at the chosen sites is 0"):
        canfast.score(
            model,
            [Sample(None, s) for s in SENTENCES[:2]],
            objective=embeddings_only,
            progress=False,
        )


def test_contrastive_scores_a_sentence_encoder(encoder_dir):
    model = canfast.load(str(encoder_dir), task="base")
    scores = canfast.score(
        model,
        [Sample(None, s) for s in SENTENCES],
        objective=contrastive,
        batch_size=4,
        progress=False,
    )
    ranking = scores.ranking()
    assert ranking.scores[0] > ranking.scores[-1] >= 0


def test_ties_are_recorded_in_neurons_json_and_described():
    from canfast.io import describe_ties, neuron_records

    scores = canfast.Scores(
        {"b.0.up": torch.tensor([1.0, 3.0, 0.0]), "a.0.up": torch.tensor([3.0, 0.0, 0.0])}
    )
    ranking = scores.ranking()
    records = neuron_records(ranking)
    assert [r["rank"] for r in records] == [1, 1, 3, 4, 4, 4]
    assert [r.get("tied") for r in records] == [2, 2, None, 3, 3, 3]
    line = describe_ties(ranking, shown=5)
    assert "5 of 6 neurons" in line and "3 neurons at 0" in line and "inside a tie of 3" in line
    distinct = canfast.Scores({"a.0.up": torch.tensor([1.0, 2.0, 3.0])}).ranking()
    assert describe_ties(distinct) is None
    assert all("tied" not in r for r in neuron_records(distinct))


def test_images_on_disk_encode_like_images_in_memory(tmp_path):
    """The batch decodes paths itself: the same pixels as a PIL image give the same inputs, and
    a large image is reduced first (to twice the processor's side) and still encodes."""
    model = tiny_models.wrap("llava")
    pictures = [tiny_models.image(i) for i in range(2)]
    for i, picture in enumerate(pictures):
        picture.save(tmp_path / f"{i}.png")
    in_memory = [Sample(p, "what colour ?", "red") for p in pictures]
    on_disk = [Sample(tmp_path / f"{i}.png", "what colour ?", "red") for i in range(2)]
    a, b = model.encode(in_memory), model.encode(on_disk)
    assert a.inputs.keys() == b.inputs.keys()
    for key in a.inputs:
        assert torch.equal(a.inputs[key], b.inputs[key]), key
    write_png(tmp_path / "big.png", (640, 480))
    big = model.encode([Sample(tmp_path / "big.png", "what colour ?", "red")])
    assert big.inputs["pixel_values"].shape[1:] == a.inputs["pixel_values"].shape[1:]


def test_a_huge_schedule_range_is_bounded_by_the_neuron_count():
    from canfast.sweep.schedule import parse_schedule

    assert parse_schedule("1:1000000000000", 5) == [1, 2, 3, 4, 5]
    assert parse_schedule("-1000000000000:3,4", 10) == [1, 2, 3, 4]
    with pytest.raises(BadInput, match="schedule"):
        parse_schedule("1:10:0", 10)


def test_a_prompt_longer_than_the_model_positions_is_refused(mlm_dir):
    model = canfast.load(str(mlm_dir))
    long = " ".join(["the square is red ."] * 20) + " [MASK]"
    with pytest.raises(BadInput, match=r"tokens long, over the 64 positions"):
        model.encode([Sample(None, long, "red")])


def test_a_target_of_unknown_tokens_only_is_refused_saying_how_many():
    model = tiny_models.wrap("llama")
    with pytest.raises(BadInput, match=r"becomes 3 unknown tokens \(<unk>\) only"):
        model.encode([Sample(None, "what color is the square ?", "zebra quokka okapi")])
    model.encode([Sample(None, "what color is the square ?", "red zebra")])  # one known: fine


def test_cli_ctrl_c_exits_130_saying_interrupted(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "canfast.cli", "score", "--out", "run", "--batch-size", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen = b""
    while b"scoring" not in seen and b"generat" not in seen:
        byte = proc.stderr.read(1)
        assert byte, f"ended before scoring: {seen.decode(errors='replace')}"
        seen += byte
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == 130, err
    assert "canfast: interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ----- wired through the pipeline and the CLI --------------------------------------------------


def test_cli_out_under_a_file_fails_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("x")
    result = run_cli("score", "--out", "a-file/run", "--data", "missing.jsonl", cwd=tmp_path)
    # --out is checked first: the data file is not even looked at.
    assert_bad_input(result, "a-file", "not a directory")
    assert (tmp_path / "a-file").read_text() == "x"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["sweep", "--seeds", "-1"], ["--seeds", "-1"]),
        (["bench"], ["bench"]),
        (["sweep", "--criterion", "log"], ["--criterion"]),
    ],
)
def test_cli_refuses_bad_options(tmp_path, args, named):
    assert_bad_input(run_cli(*args, cwd=tmp_path), *named)
    assert nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("records", "k", "named"),
    [
        ([{"neuron": 17, "score": 1.0}], 1, ["record 1", "17", "not a neuron id"]),
        ([{"neuron": "language.0.up:1", "score": 1.0}], 5, ["--k 5", "1 neurons"]),
    ],
)
def test_cli_generate_refuses_bad_neuron_files(tmp_path, records, k, named):
    (tmp_path / "neurons.json").write_text(json.dumps(records))
    result = run_cli("generate", "--neurons", "neurons.json", "--k", str(k), cwd=tmp_path)
    assert_bad_input(result, *named)


def test_cli_loads_the_base_model_and_pickle_weights_when_asked(models, tmp_path):
    result = run_cli("sites", "--model", models["encoder"], "--task", "base", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "language.1.down" in result.stdout
    result = run_cli("sites", "--model", models["pickle"], "--allow-pickle", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_cli_a_masked_lm_without_mask_tokens_is_refused(models, tmp_path):
    (tmp_path / "sentences.jsonl").write_text(
        "".join(json.dumps({"prompt": s}) + "\n" for s in SENTENCES[:3])
    )
    good = models["encoder"].parent / "good"
    result = run_cli("score", "--model", good, "--data", "sentences.jsonl", cwd=tmp_path)
    assert_bad_input(result, "no sample has a target token")
    assert nothing_written(tmp_path)


FAST = ["--limit", "2", "--max-new-tokens", "3", "--batch-size", "2"]


def earlier_run(path: Path) -> dict[str, bytes]:
    """A finished sweep run's files, as a user would find them."""
    path.mkdir()
    for name in ("scores.safetensors", "neurons.json", "sweep.json", "report.html"):
        (path / name).write_text(f"old {name}")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_cli_score_overwrite_replaces_a_sweep_run_whole(tmp_path):
    earlier_run(tmp_path / "run")
    result = run_cli("score", "--out", "run", "--overwrite", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "manifest.json",
        "neurons.json",
        "scores.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def start_cli(args: list[str], cwd: Path) -> tuple[subprocess.Popen, bytes]:
    """A CLI run, returned once it is scoring (past every check, holding its lock)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "canfast.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    seen = b""
    while b"scoring" not in seen:
        byte = proc.stderr.read(1)
        assert byte, f"ended before scoring: {seen.decode(errors='replace')}"
        seen += byte
    return proc, seen


def test_cli_a_second_run_into_the_same_out_exits_2_naming_the_first(tmp_path):
    from canfast.io import RunDir

    before = earlier_run(tmp_path / "run")
    first = RunDir(tmp_path / "run", overwrite=True).open()  # the first run, in this process
    try:
        second = run_cli("score", "--out", "run", "--overwrite", *FAST, cwd=tmp_path)
    finally:
        first.close()  # ends without completing: nothing committed
    assert_bad_input(second, "in use by another canfast run", f"process {os.getpid()}")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_cli_a_killed_overwrite_keeps_the_earlier_run_whole(tmp_path, how):
    before = earlier_run(tmp_path / "run")
    args = ["score", "--out", "run", "--overwrite", "--batch-size", "1", "--limit", "16"]
    proc, seen = start_cli(args, tmp_path)
    proc.send_signal(how)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).decode(errors="replace")
    assert proc.returncode == (130 if how == signal.SIGINT else 143), err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def drift_setup(encoder_dir):
    model = canfast.load(str(encoder_dir), task="base")
    samples = [Sample(None, s) for s in SENTENCES]
    scores = canfast.score(model, samples, objective=contrastive, batch_size=4, progress=False)
    return model, samples, scores, embedding_drift(model, samples)


def test_a_sweep_of_a_model_that_cannot_generate_skips_generations_and_says_so(encoder_dir):
    from canfast.errors import CanfastWarning

    model, samples, scores, drift = drift_setup(encoder_dir)
    with pytest.warns(CanfastWarning, match="cannot generate"):
        result = canfast.sweep(
            model,
            samples,
            scores,
            objective=drift,
            schedule=[1, 8],
            seeds=1,
            generations=2,
            criterion="delta",
            tau=0.01,
            progress=False,
        )
    assert result.info["generations"].startswith("skipped")
    assert result.generations == []


def test_the_delta_criterion_and_a_warning_when_collapse_cannot_be_reached(encoder_dir):
    from canfast.errors import CanfastWarning

    model, samples, scores, drift = drift_setup(encoder_dir)
    common = dict(objective=drift, schedule=[1, 4, 16, 64], seeds=1, generations=0, progress=False)
    # Drift never exceeds 2: a PPL ratio of 10 (a rise of ln 10 = 2.3) is out of reach.
    with pytest.warns(CanfastWarning, match="collapse cannot be reached"):
        ratio = canfast.sweep(model, samples, scores, tau=1.0, **common)
    assert ratio.k_star is None
    fully = ratio.info["fully_masked"]
    assert fully["reachable"] is False and fully["mean_loss_rise"] < fully["needed_rise"]
    # As an absolute rise of the mean drift, the same curve collapses where the drift passes tau.
    rise = fully["mean_loss_rise"]
    delta = canfast.sweep(model, samples, scores, tau=rise / 2, criterion="delta", **common)
    rises = [math.log(p / delta.ppl0) for p in delta.curve.ppl]
    first = next(k for k, r in zip(delta.curve.k, rises) if r >= rise / 2)
    assert delta.k_star == first
    record = delta.to_json()["criterion"]
    assert record["kind"] == "delta" and record["delta"] == pytest.approx(rise / 2)


def test_a_failed_report_keeps_the_sweep_and_says_what_failed(tmp_path, monkeypatch):
    import canfast.report
    from canfast.io import read_manifest
    from canfast.pipeline import DataConfig, ModelConfig, SweepConfig, run

    def broken(run_dir, name=None):
        raise RuntimeError("no figures today")

    monkeypatch.setattr(canfast.report, "write_report", broken)
    done = run(
        ModelConfig("builtin:tiny-llava"),
        DataConfig(limit=2, max_new_tokens=3, batch_size=2),
        sweep=SweepConfig(schedule=[1, 2], seeds=1, generations=0),
        out=tmp_path / "run",
    )
    assert done.failed.startswith("report: RuntimeError: no figures today")
    manifest = read_manifest(tmp_path / "run")
    assert manifest["complete"] is False and "sweep.json" in manifest["files"]
    assert json.loads((tmp_path / "run" / "sweep.json").read_text())["k"] == [1, 2]


def test_a_custom_objective_that_needs_no_targets_takes_samples_without_them(monkeypatch):
    from canfast import objective as objective_module

    model = tiny_models.wrap("llama")

    def logit_energy(outputs, batch):
        return outputs.logits.float().pow(2).mean(dim=(1, 2))

    logit_energy.needs_targets = False

    def no_generation(*args, **kwargs):
        raise AssertionError("generated targets nobody needs")

    monkeypatch.setattr(objective_module, "generate_answers", no_generation)
    samples = [Sample(None, p) for p, _ in tiny_models.TEXT[:3]]
    for targets in ("self", "given"):
        scores = canfast.score(
            model, samples, targets=targets, objective=logit_energy, progress=False
        )
        assert scores.ranking().scores[0] > 0
    with pytest.raises(BadInput, match="1 of 2 samples have no target"):
        model.encode([Sample(None, "a", "red"), Sample(None, "b")])


def test_given_targets_that_are_blank_are_refused_from_python_too():
    model = tiny_models.wrap("llama")
    with pytest.raises(BadInput, match="1 samples have an empty target"):
        canfast.score(
            model,
            [Sample(None, "a", "red"), Sample(None, "b", " ")],
            targets="given",
            progress=False,
        )


def test_command_line_runs_keep_the_hub_clients_retry_log_quiet():
    """A model id that cannot be fetched must be one error line: the Hub client logs each failed
    request as a warning, which quiet_transformers silences with transformers' own."""
    import logging

    import huggingface_hub.utils

    from canfast.model import quiet_transformers

    logger = huggingface_hub.utils.logging.get_logger()
    before = logger.level
    try:
        logger.setLevel(logging.WARNING)
        quiet_transformers()
        assert logger.getEffectiveLevel() >= logging.ERROR
    finally:
        logger.setLevel(before)
