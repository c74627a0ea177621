"""The built-in models and data: deterministic scenes, disjoint splits, tokenizers that round-trip,
shipped weights that are small and accurate, and a training script that runs."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from canfast.data import Sample, load_data
from canfast.errors import BadInput
from canfast.zoo import (
    BUILTIN_DATA,
    BUILTIN_MODELS,
    WEIGHTS_DIR,
    answer_accuracy,
    builtin_samples,
    evaluation_samples,
    is_caption,
    load_builtin_model,
    weights_path,
)
from canfast.zoo.build import NUM_QUERY_TOKENS, PATCH_SIZE, build
from canfast.zoo.inputs import LAYOUTS, PromptCache, collate, teacher_forced_exact
from canfast.zoo.scenes import (
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    QUESTION_TYPES,
    SHAPE_KINDS,
    SPLITS,
    make_scene,
    scenes,
    vocabulary,
)

# Tiny models on a loaded two-core machine: two threads mostly wait for each other (generation
# ran 50x slower with two).
pytestmark = pytest.mark.usefixtures("one_thread")

# Held-out scenes scored per model; each gives one caption and one question.
ACCURACY_SCENES = 400
WEIGHTS_LIMIT = 10 * 1024 * 1024
SCENES_DIGEST = "ef7fb7ffb1200b9ea0c7c7a76de2826b5cc060332e139a38898e85ced306c2d3"


def test_scenes_are_deterministic():
    first = [make_scene(seed) for seed in range(50)]
    again = [make_scene(seed) for seed in range(50)]
    assert first == again
    for a, b in zip(first, again, strict=True):
        assert a.render().tobytes() == b.render().tobytes()
        assert a.questions(a.question_rng()) == b.questions(b.question_rng())


def test_scenes_match_their_recorded_digest():
    # Recorded once: a change here means every shipped model was trained on other data.
    digest = hashlib.sha256()
    for seed in range(200):
        scene = make_scene(seed)
        digest.update(scene.key.encode())
        digest.update(scene.render().tobytes())
    assert digest.hexdigest() == SCENES_DIGEST


def test_scenes_are_varied_and_well_formed():
    drawn = [make_scene(seed) for seed in range(400)]
    assert {len(s.shapes) for s in drawn} == {1, 2}
    assert {shape.kind for s in drawn for shape in s.shapes} == set(SHAPE_KINDS)
    for scene in drawn:
        image = scene.render()
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        assert len({shape.kind for shape in scene.shapes}) == len(scene.shapes)
        assert len({shape.position for shape in scene.shapes}) == len(scene.shapes)
        # The picture shows the background and the shapes' colours, nothing else.
        wanted = {BACKGROUND} | {COLOURS[shape.colour] for shape in scene.shapes}
        assert {colour for _, colour in image.getcolors()} == wanted
        for qa in [scene.caption_qa(), *scene.questions(random.Random(0))]:
            assert set(qa.prompt.split()) <= set(vocabulary())
            assert set(qa.answer.split()) <= set(vocabulary())
            assert qa.category in SHAPE_KINDS


def test_questions_are_not_tied_to_the_picture():
    # Which shape a question asks about must not follow from how the scene was drawn.
    pairs = [s for s in scenes("train", 600) if len(s.shapes) == 2]
    for kind in QUESTION_TYPES:
        if kind == "count":
            continue
        first = sum(s.question(kind, s.question_rng()).category == s.shapes[0].kind for s in pairs)
        assert 0.35 < first / len(pairs) < 0.65, kind


def test_splits_are_disjoint_and_cover_every_seed():
    by_split: dict[str, list] = {split: [] for split in SPLITS}
    for seed in range(3000):
        scene = make_scene(seed)
        by_split[scene.split].append(scene)
    assert sum(len(v) for v in by_split.values()) == 3000
    assert len(by_split["train"]) > 5 * len(by_split["evaluation"]) > 0
    assert len(by_split["validation"]) > 0
    seeds = {split: {s.seed for s in v} for split, v in by_split.items()}
    keys = {split: {s.key for s in v} for split, v in by_split.items()}
    pixels = {split: {s.render().tobytes() for s in v} for split, v in by_split.items()}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not seeds[a] & seeds[b]
            assert not keys[a] & keys[b]
            assert not pixels[a] & pixels[b]
    # The split generator agrees with the hash.
    assert all(s.split == "evaluation" for s in scenes("evaluation", 30))


def test_builtin_shapes_data():
    samples = builtin_samples("shapes")
    assert samples == builtin_samples("shapes")
    assert 64 <= len(samples) <= 96
    assert all(isinstance(s, Sample) and s.target and s.category in SHAPE_KINDS for s in samples)
    captions = [s for s in samples if is_caption(s)]
    assert len(captions) == len(samples) // 2
    asked = {s.prompt.split()[0] for s in samples if not is_caption(s)}
    assert asked == {"what", "how"}
    assert [s.prompt for s in load_data("builtin:shapes")] == [s.prompt for s in samples]
    # builtin:shapes comes from the evaluation split only.
    evaluation_keys = {s.render().tobytes() for s in scenes("evaluation", 60)}
    assert {s.image.tobytes() for s in samples} <= evaluation_keys


def test_unknown_names_are_bad_input():
    with pytest.raises(BadInput, match="tiny-llava, tiny-instructblip"):
        load_builtin_model("llava-7b")
    with pytest.raises(BadInput, match="shapes"):
        builtin_samples("nope")
    assert BUILTIN_MODELS == ("tiny-llava", "tiny-instructblip")
    assert BUILTIN_DATA == ("shapes",)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_tokenizer_and_processor_round_trip(name, tmp_path):
    from transformers import AutoProcessor

    _, processor = build(name)
    tokenizer = processor.tokenizer
    assert tokenizer.unk_token_id not in tokenizer(" ".join(vocabulary()))["input_ids"]
    for scene in scenes("evaluation", 20):
        for qa in [scene.caption_qa(), *scene.questions(scene.question_rng())]:
            ids = tokenizer(qa.answer, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(qa.answer.split())
            decoded = tokenizer.decode([*ids, tokenizer.eos_token_id], skip_special_tokens=True)
            assert decoded == qa.answer

    image = make_scene(0).render()
    text = "USER: <image>\nwhat colour is the circle ? ASSISTANT:"
    if name == "tiny-instructblip":
        text = "what colour is the circle ?"
    encoding = processor(images=[image], text=[text])
    ids = encoding["input_ids"][0]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    expected = NUM_QUERY_TOKENS if name == "tiny-instructblip" else (IMAGE_SIZE // PATCH_SIZE) ** 2
    assert ids.count(image_id) == expected
    assert tokenizer.unk_token_id not in ids
    words = tokenizer.convert_ids_to_tokens(ids)
    if name == "tiny-llava":
        assert words[:3] == ["<s>", "USER", ":"] and words[-2:] == ["ASSISTANT", ":"]
    else:
        assert words[NUM_QUERY_TOKENS] == "<s>" and words[:NUM_QUERY_TOKENS] == ["<image>"] * 8

    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert type(again) is type(processor)
    assert "Pil" in type(again.image_processor).__name__
    reencoded = again(images=[image], text=[text])
    assert reencoded["input_ids"] == encoding["input_ids"]
    assert (reencoded["pixel_values"][0] == encoding["pixel_values"][0]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacher_forced_batch_layout(layout):
    _, processor = build("tiny-instructblip")
    cache = PromptCache(processor, "instructblip", make_scene(0).render())
    short, long = (
        cache.encode("how big is the cross ?", "small"),
        cache.encode("describe the image .", "a small red circle at the top left"),
    )
    pixels = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = collate(
        [short, long], pixels, 0, 0, NUM_QUERY_TOKENS, layout=layout, qformer_side="right"
    )
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    # Each row holds exactly its prompt and target, in order, wherever the padding goes.
    for row, encoded in enumerate((short, long)):
        kept = ids[row][attention[row].bool()].tolist()
        assert kept == encoded.prompt_ids + encoded.target_ids
        assert labels[row][labels[row] != -100].tolist() == encoded.target_ids
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    if layout == "middle":
        # As the processor pads: query placeholders first, padding between them and the text.
        assert (ids[:, :NUM_QUERY_TOKENS] == image_id).all()
        assert attention[0, NUM_QUERY_TOKENS] == 0
    # The Q-Former's text is padded on the right here: the caption prompt is the shorter one.
    assert batch["qformer_attention_mask"][:, 0].tolist() == [1, 1]
    assert batch["qformer_attention_mask"][:, -1].tolist() == [1, 0]
    logits = torch.full((*labels.shape, 50), -1.0)
    logits[:, :-1].scatter_(-1, labels[:, 1:].clamp(min=0)[..., None], 1.0)
    assert teacher_forced_exact(logits, labels).all()
    last = (labels[1] != -100).nonzero().max()
    logits[1, last - 1] = 0
    assert teacher_forced_exact(logits, labels).tolist() == [True, False]


def test_shipped_weights_are_small():
    files = [p for p in WEIGHTS_DIR.rglob("*.safetensors")]
    assert {p.parent.name for p in files} == set(BUILTIN_MODELS)
    assert sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file()) <= WEIGHTS_LIMIT


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_shipped_model_is_accurate_on_held_out_scenes(name):
    assert (weights_path(name) / "config.json").is_file(), "run python -m canfast.zoo.train"
    model, processor = load_builtin_model(name)
    assert model.dtype == torch.float32
    result = answer_accuracy(model, processor, evaluation_samples(ACCURACY_SCENES), name)
    assert result["n_captions"] == result["n_answers"] == ACCURACY_SCENES
    assert result["captions"] >= 0.95, result
    assert result["answers"] >= 0.95, result


def test_untrained_model_when_no_weights(monkeypatch, tmp_path):
    import canfast.zoo as zoo

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    model, processor = load_builtin_model("tiny-llava")
    again, _ = load_builtin_model("tiny-llava")
    weights = dict(model.named_parameters())
    assert all(torch.equal(p, weights[n]) for n, p in again.named_parameters())
    result = answer_accuracy(model, processor, builtin_samples("shapes")[:8], "tiny-llava")
    assert result["captions"] == 0.0


def test_training_script_runs_a_few_steps_deterministically(tmp_path):
    import json

    from canfast.zoo.train import main

    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["--steps", "2", "--out", str(out), "--eval-scenes", "4"]) == 0
    for name in BUILTIN_MODELS:
        saved = tmp_path / "a" / name
        config = json.loads((saved / "config.json").read_text())
        assert config["model_type"] in {"llava", "instructblip"}
        weights = (saved / "model.safetensors").read_bytes()
        assert weights == (tmp_path / "b" / name / "model.safetensors").read_bytes()
        model, processor = load_builtin_model(name)
        assert model.config.model_type == config["model_type"]
        # The untrained-then-2-steps weights differ from the shipped ones.
        assert weights != (weights_path(name) / "model.safetensors").read_bytes()


def test_evaluate_counts_captions_and_answers_separately():
    model, processor = load_builtin_model("tiny-llava")
    samples = builtin_samples("shapes")[:12]
    result = answer_accuracy(model, processor, samples, "llava")
    assert result["n_captions"] == result["n_answers"] == 6
    wrong = [s.with_target("zzz") for s in samples]
    assert answer_accuracy(model, processor, wrong, "llava")["answers"] == 0.0
    with pytest.raises(BadInput, match="llava"):
        answer_accuracy(model, processor, samples, "gpt2")


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_training_format_is_canfast_format(name):
    """The zoo trains on exactly what canfast scores (teacher-forced, right-padded); it
    generates with canfast.generate itself."""
    from canfast.model import Model
    from canfast.zoo.inputs import family_of

    hf_model, processor = build(name)
    model = Model(hf_model, processor, name=f"builtin:{name}")
    samples = evaluation_samples(3)
    family = family_of(name)

    scored = model.encode(samples)
    cache = PromptCache(processor, family, samples[0].image)
    encoded = [cache.encode(s.prompt, s.target) for s in samples]
    pixels = scored.inputs["pixel_values"]
    queries = NUM_QUERY_TOKENS if family == "instructblip" else 0
    ours = collate(encoded, pixels, processor.tokenizer.pad_token_id, 0, queries, layout="right")
    for key in ("input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"):
        if key in scored.inputs:
            assert torch.equal(ours[key], scored.inputs[key]), key
    # canfast's labels are shifted to the logit that predicts them; ours sit on the token.
    assert torch.equal(ours["labels"][:, 1:], scored.labels[:, :-1])
