"""Train the built-in models on synthetic scenes: ``python -m canfast.zoo.train``.

Deterministic (fixed seeds, fixed data order, one thread) and CPU-only. Two stages, as for the
real models:

1. The image side alone learns to see, through throw-away linear probes: on the patch features
   the rest of the model reads, which quadrant each patch lies in and what shape (kind, colour,
   size) each quadrant holds; for InstructBLIP also, from all Q-Former queries together, what
   every quadrant holds. This stands in for the CLIP/EVA and Q-Former pre-training the real
   models come with: trained only through the language model, a tiny tower learns colours fast
   but shapes very slowly, and the Q-Former hardly at all.
2. The whole model learns captions and answers, the loss on the target tokens and ``</s>``.
   Batches are padded in every layout canfast and the Hugging Face processor use.

It checks teacher-forced exact match on the validation split as it goes, saves model and
processor (weights as float16 safetensors), then reloads what it saved and reports the greedy
exact-match accuracy on held-out evaluation scenes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from canfast.zoo import BUILTIN_MODELS, WEIGHTS_DIR, answer_accuracy, evaluation_samples
from canfast.zoo.build import SEED, build
from canfast.zoo.inputs import (
    LAYOUTS,
    PromptCache,
    collate,
    family_of,
    teacher_forced_exact,
)
from canfast.zoo.scenes import (
    CAPTION_PROMPT,
    COLOURS,
    POSITIONS,
    QUESTION_TYPES,
    SHAPE_KINDS,
    SIZES,
    scenes,
)

# Enough for >= 95% held-out exact match in about 8 minutes of one (shared) CPU core.
DEFAULT_STEPS = {"tiny-llava": 2000, "tiny-instructblip": 2000}
BATCH_SIZE = 48
LEARNING_RATE = 2e-3
WARMUP = 100
TRAIN_SCENES = 8000
VALIDATION_SCENES = 192
EVALUATION_SCENES = 400
# A caption has about 13 target tokens, an answer 2 to 5: with a third of captions, captions
# still carry most of the (per-token) loss, and answers enough to be learned in time.
CAPTION_SHARE = 0.33
# Stage 1 steps: the Q-Former takes longer to learn than a bare vision tower.
VISION_STEPS = {"tiny-llava": 400, "tiny-instructblip": 800}
VISION_BATCH = 64
VISION_LEARNING_RATE = 1e-3


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class TrainingData:
    """Train scenes as processor-made pixel values plus (scene, prompt, target) triples."""

    def __init__(self, processor, family: str, count: int) -> None:
        import torch

        started = time.perf_counter()
        self.scenes = list(scenes("train", count))
        images = [scene.render() for scene in self.scenes]
        pixels = []
        for start in range(0, len(images), 512):
            part = processor.image_processor(images[start : start + 512], return_tensors="pt")
            pixels.append(part["pixel_values"])
        self.pixel_values = torch.cat(pixels)
        self.cache = PromptCache(processor, family, images[0])
        self.captions = [(i, scene.caption_qa()) for i, scene in enumerate(self.scenes)]
        _log(f"data: {len(self.scenes)} train scenes ({time.perf_counter() - started:.1f}s)")

    def quadrant_labels(self):
        """Per scene and quadrant: kind, colour and size indices, the last index meaning empty."""
        import torch

        labels = torch.empty((len(self.scenes), len(POSITIONS), 3), dtype=torch.long)
        labels[..., 0], labels[..., 1], labels[..., 2] = len(SHAPE_KINDS), len(COLOURS), len(SIZES)
        for row, scene in enumerate(self.scenes):
            for shape in scene.shapes:
                labels[row, POSITIONS.index(shape.position)] = torch.tensor(
                    [
                        SHAPE_KINDS.index(shape.kind),
                        list(COLOURS).index(shape.colour),
                        list(SIZES).index(shape.size),
                    ]
                )
        return labels

    def batch(self, rng: random.Random, size: int, collate_args: dict) -> dict:
        """A random batch of captions and questions, padded in a random layout."""
        captions = round(size * CAPTION_SHARE)
        picked = rng.sample(self.captions, captions)
        # Questions are drawn afresh: any type, about any shape of any scene.
        for _ in range(size - captions):
            index = rng.randrange(len(self.scenes))
            picked.append((index, self.scenes[index].question(rng.choice(QUESTION_TYPES), rng)))
        encoded = [self.cache.encode(qa.prompt, qa.answer) for _, qa in picked]
        pixels = self.pixel_values[[i for i, _ in picked]]
        return collate(encoded, pixels, **collate_args, layout=rng.choice(LAYOUTS))


def _validation_batches(
    processor, family: str, collate_args: dict, count: int
) -> list[tuple[str, dict]]:
    """Teacher-forced batches of ``count`` validation captions and as many questions."""
    batches = []
    samples = list(scenes("validation", count))
    images = [scene.render() for scene in samples]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    cache = PromptCache(processor, family, images[0])
    captions = [cache.encode(s.caption_qa().prompt, s.caption()) for s in samples]
    questions = []
    for index, scene in enumerate(samples):
        qa = scene.question(QUESTION_TYPES[index % len(QUESTION_TYPES)], scene.question_rng())
        questions.append(cache.encode(qa.prompt, qa.answer))
    # As canfast pads for scoring, and as the Hugging Face processor pads.
    for suffix, layout in (("", "right"), ("_middle_padded", "middle")):
        for group, encoded in (("captions", captions), ("answers", questions)):
            for start in range(0, len(encoded), 96):
                part = encoded[start : start + 96]
                pixel_part = pixels[start : start + len(part)]
                batch = collate(part, pixel_part, **collate_args, layout=layout)
                batches.append((group + suffix, batch))
    return batches


def _validate(model, batches: list[tuple[str, dict]]) -> dict[str, float]:
    """Teacher-forced exact match per group: the greedy answer would be the target."""
    import torch

    right: dict[str, int] = {}
    total: dict[str, int] = {}
    model.eval()
    with torch.no_grad():
        for group, batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            exact = teacher_forced_exact(model(**inputs).logits, batch["labels"])
            right[group] = right.get(group, 0) + int(exact.sum())
            total[group] = total.get(group, 0) + len(exact)
    model.train()
    return {group: right[group] / total[group] for group in total}


def _quadrant_means(patches, width: int):
    """(batch, patches, width) -> (batch, 4, width): the mean patch feature of each quadrant."""
    import torch

    side = round(patches.shape[1] ** 0.5)
    grid = patches.reshape(len(patches), side, side, width)
    top, left = slice(None, side // 2), slice(None, side // 2)
    bottom, right = slice(side // 2, None), slice(side // 2, None)
    corners = ((top, left), (top, right), (bottom, left), (bottom, right))
    return torch.stack([grid[:, rows, cols].mean((1, 2)) for rows, cols in corners], dim=1)


def _quadrant_of_patch(patches):
    """The quadrant index (reading order) of every patch of a square grid, CLS excluded."""
    import torch

    side = round(patches.shape[1] ** 0.5)
    row, column = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    return (row >= side // 2) * 2 + (column >= side // 2)


def _pretrain_vision(model, family: str, data: TrainingData, steps: int) -> list[dict]:
    """Stage 1: the image side learns what is in each quadrant, through linear probes.

    The probes read each patch's feature (which quadrant is it in?), each quadrant's mean
    patch feature (what is there?) and, for InstructBLIP, all query outputs of the Q-Former
    together (what is in every quadrant?). BLIP-2 also pre-trains its Q-Former before joining
    it to a language model, whose gradient alone barely reaches it: its cross-attention starts
    out averaging every patch alike. Knowing the quadrant of each patch makes "where is the
    circle ?" a lookup for the language model instead of a puzzle over token positions.
    """
    import torch

    labels = data.quadrant_labels()
    classes = (len(SHAPE_KINDS) + 1, len(COLOURS) + 1, len(SIZES) + 1)
    width = model.config.vision_config.hidden_size
    patch_probes = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in classes)
    where_probe = torch.nn.Linear(width, len(POSITIONS))
    trained = [*patch_probes.parameters(), *where_probe.parameters()]
    if family == "llava":
        trained += model.model.vision_tower.parameters()
    else:
        queries, query_width = (
            model.config.num_query_tokens,
            model.config.qformer_config.hidden_size,
        )
        query_probe = torch.nn.Linear(queries * query_width, len(POSITIONS) * sum(classes))
        trained += [*query_probe.parameters(), *model.vision_model.parameters()]
        trained += [*model.qformer.parameters(), model.query_tokens]
        qformer_ids = torch.tensor([data.cache.prompt(CAPTION_PROMPT)[1]])
    optimizer = torch.optim.AdamW(trained, lr=VISION_LEARNING_RATE, weight_decay=0.01)
    rng = torch.Generator().manual_seed(SEED)
    history = []
    for step in range(steps):
        rows = torch.randint(0, len(labels), (VISION_BATCH,), generator=rng)
        wanted = labels[rows]
        pixels = data.pixel_values[rows]
        if family == "llava":
            layer = model.config.vision_feature_layer
            hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
            patches = hidden.hidden_states[layer][:, 1:]
            predicted = []
        else:
            features = model.get_image_features(
                pixels, qformer_input_ids=qformer_ids.expand(len(rows), -1), return_dict=True
            )
            patches = features.last_hidden_state[:, 1:]
            query_out = features.qformer_outputs[0][:, :queries].flatten(1)
            logits = query_probe(query_out).view(len(rows), len(POSITIONS), sum(classes))
            predicted = list(logits.split(classes, dim=-1))
        quadrants = _quadrant_means(patches, width)
        predicted = [*(probe(quadrants) for probe in patch_probes), *predicted]
        loss = sum(
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), wanted[..., k % len(classes)].flatten()
            )
            for k, logits in enumerate(predicted)
        ) + torch.nn.functional.cross_entropy(
            where_probe(patches).flatten(0, 1), _quadrant_of_patch(patches).repeat(len(rows))
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            history.append({"vision_step": step + 1, "loss": round(loss.item(), 4)})
            _log(f"vision: {json.dumps(history[-1])}")
    return history


def _learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < WARMUP:
        return LEARNING_RATE * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    name: str,
    steps: int,
    out: Path,
    evaluation_scenes: int = EVALUATION_SCENES,
    validate_every: int = 500,
) -> dict:
    """Train built-in model ``name`` for ``steps`` steps, save it into ``out / name``, and
    return a summary with the held-out accuracies of the saved model."""
    import torch

    started = time.perf_counter()
    torch.manual_seed(SEED)
    model, processor = build(name)
    family = family_of(name)
    tokenizer = processor.tokenizer
    collate_args = {
        "pad_id": tokenizer.pad_token_id,
        "qformer_pad_id": getattr(processor, "qformer_tokenizer", tokenizer).pad_token_id,
        "num_query_tokens": getattr(model.config, "num_query_tokens", 0)
        if family == "instructblip"
        else 0,
    }
    parameters = sum(p.numel() for p in model.parameters())
    _log(f"{name}: {parameters:,} parameters, {steps} steps of {BATCH_SIZE}")

    # A smoke run (a few steps) needs only a taste of the data.
    smoke = steps <= 10
    data = TrainingData(processor, family, 64 if smoke else TRAIN_SCENES)
    validation = _validation_batches(
        processor, family, collate_args, 16 if smoke else VALIDATION_SCENES
    )
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
        betas=(0.9, 0.98),
    )
    model.train()
    history = _pretrain_vision(model, family, data, min(VISION_STEPS[name], steps))
    rng = random.Random(SEED)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps)
        loss = model(**data.batch(rng, BATCH_SIZE, collate_args)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            line = {"step": step + 1, "loss": round(loss.item(), 4)}
            if (step + 1) % validate_every == 0 or step + 1 == steps:
                line |= {f"val_{k}": round(v, 4) for k, v in _validate(model, validation).items()}
            line["seconds"] = round(time.perf_counter() - started, 1)
            history.append(line)
            _log(f"{name}: {json.dumps(line)}")
    train_seconds = time.perf_counter() - started

    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    model.eval().to(torch.float16).save_pretrained(target)
    processor.save_pretrained(target)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    saved = AutoModelForImageTextToText.from_pretrained(target, dtype=torch.float32).eval()
    saved_processor = AutoProcessor.from_pretrained(target)
    accuracy = answer_accuracy(saved, saved_processor, evaluation_samples(evaluation_scenes), name)
    summary = {
        "model": name,
        "parameters": parameters,
        "weights_bytes": sum(f.stat().st_size for f in target.glob("*.safetensors")),
        "steps": steps,
        "train_seconds": round(train_seconds, 1),
        "evaluation": {k: v for k, v in accuracy.items() if k != "mistakes"},
        "mistakes": accuracy["mistakes"][:5],
        "history": history,
    }
    _log(f"{name}: {json.dumps(summary['evaluation'])}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m canfast.zoo.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", choices=[*BUILTIN_MODELS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: tuned)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="where <name>/ goes")
    parser.add_argument(
        "--eval-scenes", type=int, default=EVALUATION_SCENES, help="held-out scenes to score"
    )
    # One thread by default: the shipped weights were trained so, and summation order (thus the
    # last bits of every weight) depends on how many threads split a matrix product.
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--validate-every", type=int, default=500, help="steps between checks")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    names = BUILTIN_MODELS if args.model == "all" else (args.model,)
    summaries = [
        train(
            name,
            args.steps or DEFAULT_STEPS[name],
            args.out,
            args.eval_scenes,
            args.validate_every,
        )
        for name in names
    ]
    print(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
