"""Train the built-in models on synthetic scenes: ``python -m canfast.zoo.train``.

Deterministic (fixed seeds, fixed data order) and CPU-only. Two stages, as for the real models:

1. The vision tower alone learns to see: from its patch features (those the rest of the model
   reads) a throw-away linear probe per quadrant predicts the kind, colour and size of the shape
   there. This stands in for the CLIP/EVA pre-training the real towers come with; trained only
   through the language model, a tiny tower learns colours fast but shapes very slowly.
2. The whole model learns captions and answers, the loss on the target tokens and ``</s>``.

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

from canfast.zoo import BUILTIN_MODELS, WEIGHTS_DIR, evaluate, evaluation_samples
from canfast.zoo.build import SEED, build
from canfast.zoo.inputs import (
    IGNORE_INDEX,
    PromptCache,
    collate,
    family_of,
    teacher_forced_exact,
)
from canfast.zoo.scenes import COLOURS, KINDS, POSITIONS, QUESTION_TYPES, SIZES, scenes

# Steps, batch, learning rate: enough for >= 95% held-out exact match in about 8 CPU minutes.
DEFAULT_STEPS = {"tiny-llava": 1500, "tiny-instructblip": 1500}
BATCH_SIZE = 48
LEARNING_RATE = 2e-3
WARMUP = 100
TRAIN_SCENES = 8000
VALIDATION_SCENES = 192
EVALUATION_SCENES = 400
# Captions are the long, hard targets: give them a large share of every batch.
CAPTION_SHARE = 0.4
VISION_STEPS = 400
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
        self.questions = []
        for i, scene in enumerate(self.scenes):
            rng = random.Random(scene.seed)
            self.questions += [(i, qa) for qa in scene.questions(rng)]
        _log(
            f"data: {len(self.scenes)} train scenes, {len(self.captions)} captions, "
            f"{len(self.questions)} questions ({time.perf_counter() - started:.1f}s)"
        )

    def quadrant_labels(self):
        """Per scene and quadrant: kind, colour and size indices, the last index meaning empty."""
        import torch

        labels = torch.empty((len(self.scenes), len(POSITIONS), 3), dtype=torch.long)
        labels[..., 0], labels[..., 1], labels[..., 2] = len(KINDS), len(COLOURS), len(SIZES)
        for row, scene in enumerate(self.scenes):
            for shape in scene.shapes:
                labels[row, POSITIONS.index(shape.position)] = torch.tensor(
                    [
                        KINDS.index(shape.kind),
                        list(COLOURS).index(shape.colour),
                        list(SIZES).index(shape.size),
                    ]
                )
        return labels

    def batch(self, rng: random.Random, size: int, collate_args: dict) -> dict:
        captions = round(size * CAPTION_SHARE)
        picked = rng.sample(self.captions, captions) + rng.sample(self.questions, size - captions)
        encoded = [self.cache.encode(qa.prompt, qa.answer) for _, qa in picked]
        pixels = self.pixel_values[[i for i, _ in picked]]
        return collate(encoded, pixels, **collate_args)


def _validation_batches(processor, family: str, collate_args: dict) -> list[tuple[str, dict]]:
    batches = []
    samples = list(scenes("validation", VALIDATION_SCENES))
    images = [scene.render() for scene in samples]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    cache = PromptCache(processor, family, images[0])
    captions = [cache.encode(s.caption_qa().prompt, s.caption()) for s in samples]
    questions = []
    for index, scene in enumerate(samples):
        qa = scene.question(QUESTION_TYPES[index % len(QUESTION_TYPES)], random.Random(scene.seed))
        questions.append(cache.encode(qa.prompt, qa.answer))
    for group, encoded in (("captions", captions), ("answers", questions)):
        for start in range(0, len(encoded), 96):
            part = encoded[start : start + 96]
            batches.append(
                (group, collate(part, pixels[start : start + len(part)], **collate_args))
            )
    return batches


def _validate(model, batches: list[tuple[str, dict]]) -> dict[str, float]:
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


def _patch_features(model, family: str, pixel_values):
    """The vision tower's patch features as the rest of the model reads them, CLS dropped."""
    if family == "llava":
        tower = model.model.vision_tower
        layer = model.config.vision_feature_layer
        hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
    else:
        hidden = model.vision_model(pixel_values=pixel_values).last_hidden_state
    return hidden[:, 1:]


def _pretrain_vision(model, family: str, data: TrainingData, steps: int) -> list[dict]:
    """Stage 1: the vision tower with linear probes on each quadrant's mean patch feature."""
    import torch

    labels = data.quadrant_labels()
    width = model.config.vision_config.hidden_size
    side = int(round((_patch_features(model, family, data.pixel_values[:1]).shape[1]) ** 0.5))
    probes = torch.nn.ModuleList(
        torch.nn.Linear(width, n + 1) for n in (len(KINDS), len(COLOURS), len(SIZES))
    )
    tower = model.model.vision_tower if family == "llava" else model.vision_model
    optimizer = torch.optim.AdamW(
        [*tower.parameters(), *probes.parameters()], lr=VISION_LEARNING_RATE, weight_decay=0.01
    )
    rng = torch.Generator().manual_seed(SEED)
    history = []
    for step in range(steps):
        rows = torch.randint(0, len(labels), (VISION_BATCH,), generator=rng)
        patches = _patch_features(model, family, data.pixel_values[rows])
        grid = patches.reshape(len(rows), side, side, width)
        half = side // 2
        quadrants = torch.stack(
            [
                grid[:, :half, :half].mean((1, 2)),
                grid[:, :half, half:].mean((1, 2)),
                grid[:, half:, :half].mean((1, 2)),
                grid[:, half:, half:].mean((1, 2)),
            ],
            dim=1,
        )
        loss = sum(
            torch.nn.functional.cross_entropy(
                probe(quadrants).flatten(0, 1), labels[rows][..., k].flatten()
            )
            for k, probe in enumerate(probes)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            history.append({"vision_step": step + 1, "loss": round(loss.item(), 4)})
            _log(f"vision: {json.dumps(history[-1])}")
    return history


def _sample_mean_nll(logits, labels):
    """Mean over samples of each sample's mean NLL over its target tokens and ``</s>``.

    Averaging per sample, not per token, keeps a one-word answer as weighty as a long caption;
    it is also the per-sample loss canfast scores neurons with.
    """
    import torch

    wanted = labels[:, 1:]
    counted = wanted != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), wanted.clamp(min=0), reduction="none"
    )
    per_sample = (nll * counted).sum(1) / counted.sum(1)
    return per_sample.mean()


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

    data = TrainingData(processor, family, TRAIN_SCENES if steps > 10 else 64)
    validation = _validation_batches(processor, family, collate_args)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=LEARNING_RATE,
        betas=(0.9, 0.98),
    )
    model.train()
    history = _pretrain_vision(model, family, data, min(VISION_STEPS, steps))
    rng = random.Random(SEED)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps)
        batch = data.batch(rng, BATCH_SIZE, collate_args)
        labels = batch.pop("labels")
        loss = _sample_mean_nll(model(**batch).logits, labels)
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
    accuracy = evaluate(saved, saved_processor, evaluation_samples(evaluation_scenes), name)
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
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
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
