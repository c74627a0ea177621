"""Built-in tiny vision-language models, trained by canfast on synthetic scenes, and their data.

``tiny-llava`` (CLIP tower, projector, Llama) and ``tiny-instructblip`` (ViT, Q-Former, Llama)
are real Hugging Face models of about a million parameters each, trained by
``python -m canfast.zoo.train`` to caption and answer questions about pictures of coloured
shapes. They let ``canfast sweep`` show the collapse offline and in seconds.

``builtin:shapes`` is their evaluation data: held-out scenes, half captions, half questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from canfast.errors import BadInput

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, ProcessorMixin

    from canfast.data import Sample

BUILTIN_MODELS = ("tiny-llava", "tiny-instructblip")
BUILTIN_DATA = ("shapes",)
WEIGHTS_DIR = Path(__file__).parent / "weights"
# builtin:shapes holds this many evaluation scenes, each giving one caption and one question.
SHAPES_SCENES = 48


def weights_path(name: str) -> Path:
    """Where the shipped weights and processor of built-in model ``name`` live."""
    _check(name, BUILTIN_MODELS, "built-in model")
    return WEIGHTS_DIR / name


def _check(name: str, valid: Sequence[str], what: str) -> None:
    if name not in valid:
        raise BadInput(f"unknown {what} {name!r}; valid: {', '.join(valid)}")


def load_builtin_model(
    name: str, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The trained model ``name`` and its processor, in eval mode, float32 unless ``dtype``.

    If the package holds no weights for it (before the first training run), the untrained model
    is built from a fixed seed instead, so that everything still runs.
    """
    import torch

    path = weights_path(name)
    dtype = dtype or torch.float32
    if (path / "config.json").is_file():
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    else:
        from canfast.zoo.build import build

        model, processor = build(name)
        model = model.to(dtype)
    return model.eval(), processor


def evaluation_samples(scenes: int, split: str = "evaluation") -> list[Sample]:
    """One caption and one question for each of the first ``scenes`` scenes of ``split``,
    interleaved; the question types take turns."""
    from canfast.data import Sample
    from canfast.zoo.scenes import QUESTION_TYPES
    from canfast.zoo.scenes import scenes as scene_stream

    samples = []
    for index, scene in enumerate(scene_stream(split, scenes)):
        image = scene.render()
        rng = scene.question_rng()
        for qa in (
            scene.caption_qa(),
            scene.question(QUESTION_TYPES[index % len(QUESTION_TYPES)], rng),
        ):
            samples.append(
                Sample(image=image, prompt=qa.prompt, target=qa.answer, category=qa.category)
            )
    return samples


def builtin_samples(name: str) -> list[Sample]:
    """The samples of ``builtin:NAME``; ``shapes`` is the only one (96 samples)."""
    _check(name, BUILTIN_DATA, "built-in data set")
    return evaluation_samples(SHAPES_SCENES)


def is_caption(sample: Sample) -> bool:
    from canfast.zoo.scenes import CAPTION_PROMPT

    return sample.prompt == CAPTION_PROMPT


def answer_accuracy(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    samples: Sequence[Sample],
    family: str,
) -> dict:
    """Exact-match accuracy of greedy answers, for captions and for questions separately.

    The answers are ``canfast.generate``'s (24 new tokens at most). ``family`` is the model family
    (``llava``, ``instructblip``) or a built-in model name, checked against the built-in
    families. Returns ``captions``, ``answers`` (accuracies in [0, 1], None when there are no
    such samples), their counts, and the first few mistakes.
    """
    if any(s.target is None for s in samples):
        raise BadInput("answer_accuracy needs samples with a target")
    from canfast import Model, generate
    from canfast.zoo.inputs import family_of

    family_of(family)
    wrapped = Model(model, processor)
    predictions = generate(wrapped, samples, max_new_tokens=24, batch_size=64)
    result: dict = {}
    mistakes = []
    for group, wanted in (("captions", True), ("answers", False)):
        pairs = [
            (s, p) for s, p in zip(samples, predictions, strict=True) if is_caption(s) == wanted
        ]
        right = sum(p == s.target for s, p in pairs)
        result[group] = right / len(pairs) if pairs else None
        result[f"n_{group}"] = len(pairs)
        mistakes += [
            {"prompt": s.prompt, "target": s.target, "output": p} for s, p in pairs if p != s.target
        ]
    result["mistakes"] = mistakes[:20]
    return result
