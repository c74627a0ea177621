"""How the built-in models see a sample: the prompt templates and teacher-forced batches.

The layout is the one canfast uses for every LLaVA and InstructBLIP model, so the built-in models
are trained on exactly what they are later scored and masked on:

- LLaVA: ``"USER: <image>\\n{prompt} ASSISTANT:"``; InstructBLIP: ``"{prompt}"``, the processor
  putting the query placeholders first.
- The target's tokens (without special tokens) follow the prompt's, then ``</s>``; only those
  carry a loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from canfast.errors import BadInput

if TYPE_CHECKING:
    import torch
    from PIL import Image

FAMILIES = ("llava", "instructblip")
_ALIASES = {"tiny-llava": "llava", "tiny-instructblip": "instructblip"}
IGNORE_INDEX = -100


def family_of(kind: str) -> str:
    """``"llava"`` or ``"instructblip"`` from a family, built-in model name or model_type."""
    family = _ALIASES.get(kind, kind)
    if family not in FAMILIES:
        valid = ", ".join([*FAMILIES, *_ALIASES])
        raise BadInput(f"unknown model kind {kind!r}; valid: {valid}")
    return family


def format_prompt(family: str, prompt: str) -> str:
    """The text the processor gets for ``prompt``, as canfast's adapters format it."""
    if family == "llava":
        return f"USER: <image>\n{prompt} ASSISTANT:"
    return prompt


@dataclass
class Encoded:
    """One sample's ids, unpadded: prompt ids as the processor makes them, target ids + EOS."""

    prompt_ids: list[int]
    target_ids: list[int]
    qformer_ids: list[int] | None


class PromptCache:
    """Prompt and target ids, computed once by the real processor for each distinct string.

    The synthetic language has a few dozen distinct prompts, so training never calls the
    processor in its loop yet feeds the model exactly the processor's ids.
    """

    def __init__(self, processor, family: str, image: Image.Image) -> None:
        self.processor = processor
        self.family = family
        self.image = image
        self.eos = processor.tokenizer.eos_token_id
        self._prompts: dict[str, tuple[list[int], list[int] | None]] = {}
        self._targets: dict[str, list[int]] = {}

    def prompt(self, prompt: str) -> tuple[list[int], list[int] | None]:
        """The language model's ids of the formatted prompt, and the Q-Former's (or None)."""
        if prompt not in self._prompts:
            text = format_prompt(self.family, prompt)
            encoding = self.processor(images=[self.image], text=[text])
            qformer = encoding.get("qformer_input_ids")
            self._prompts[prompt] = (
                list(encoding["input_ids"][0]),
                list(qformer[0]) if qformer is not None else None,
            )
        return self._prompts[prompt]

    def encode(self, prompt: str, target: str) -> Encoded:
        if target not in self._targets:
            ids = self.processor.tokenizer(target, add_special_tokens=False)["input_ids"]
            self._targets[target] = [*ids, self.eos]
        prompt_ids, qformer_ids = self.prompt(prompt)
        return Encoded(prompt_ids, self._targets[target], qformer_ids)


# Where the language model's padding goes. canfast pads whole rows: prompts on the left for
# generation, prompt + target on the right for scoring. "middle" is how the Hugging Face
# InstructBLIP processor pads, after the query placeholders. The Q-Former's text is always
# padded on the right, as canfast does: it has absolute positions, so left padding moves it.
LAYOUTS = ("left", "middle", "right")


def collate(
    encoded: Sequence[Encoded],
    pixel_values: torch.Tensor,
    pad_id: int,
    qformer_pad_id: int,
    num_query_tokens: int = 0,
    layout: str = "right",
    qformer_side: str = "right",
) -> dict[str, torch.Tensor]:
    """A teacher-forced batch: ids, attention masks, labels on the target tokens and EOS.

    ``layout`` (one of :data:`LAYOUTS`) places the language model's padding, ``qformer_side``
    the Q-Former's. Training on every layout makes the models indifferent to who batches them.
    """
    import torch

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    sequences = [e.prompt_ids + e.target_ids for e in encoded]
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    for row, (e, sequence) in enumerate(zip(encoded, sequences, strict=True)):
        pad = length - len(sequence)
        if layout == "left":
            placed = [(pad, sequence)]
        elif layout == "right":
            placed = [(0, sequence)]
        else:
            head = num_query_tokens
            placed = [(0, sequence[:head]), (head + pad, sequence[head:])]
        for start, part in placed:
            input_ids[row, start : start + len(part)] = torch.tensor(part, dtype=torch.long)
            attention[row, start : start + len(part)] = 1
        end = placed[-1][0] + len(placed[-1][1])
        labels[row, end - len(e.target_ids) : end] = torch.tensor(e.target_ids, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    batch["pixel_values"] = pixel_values
    if encoded[0].qformer_ids is not None:
        width = max(len(e.qformer_ids) for e in encoded)
        qformer = torch.full((len(encoded), width), qformer_pad_id, dtype=torch.long)
        qmask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            start = width - len(e.qformer_ids) if qformer_side == "left" else 0
            qformer[row, start : start + len(e.qformer_ids)] = torch.tensor(e.qformer_ids)
            qmask[row, start : start + len(e.qformer_ids)] = 1
        batch["qformer_input_ids"] = qformer
        batch["qformer_attention_mask"] = qmask
    return batch


def prompt_batch(processor, family: str, samples: Sequence) -> dict[str, torch.Tensor]:
    """Prompts ready for ``generate()``, batched as canfast batches them: each sample through
    the processor alone, then rows padded on the left and the Q-Former's text on the right."""
    import torch

    rows = [
        processor(images=[s.image], text=[format_prompt(family, s.prompt)], return_tensors="pt")
        for s in samples
    ]
    batch = {"pixel_values": torch.cat([row["pixel_values"] for row in rows])}
    pads = {"input_ids": processor.tokenizer.pad_token_id, "qformer_input_ids": 0}
    qformer = getattr(processor, "qformer_tokenizer", None)
    if qformer is not None:
        pads["qformer_input_ids"] = qformer.pad_token_id
    for key, side in (("input_ids", "left"), ("qformer_input_ids", "right")):
        if key not in rows[0]:
            continue
        mask_key = key.replace("input_ids", "attention_mask")
        width = max(row[key].shape[1] for row in rows)
        ids = torch.full((len(rows), width), pads[key], dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = row[key].shape[1]
            where = slice(width - n, None) if side == "left" else slice(None, n)
            ids[i, where] = row[key][0]
            mask[i, where] = 1
        batch[key], batch[mask_key] = ids, mask
    return batch


def teacher_forced_exact(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample: is every target token (and ``</s>``) the argmax given the tokens before it?

    This is exactly "greedy decoding reproduces the target and stops", at the cost of one
    forward pass instead of one per generated token.
    """
    predicted = logits[:, :-1].argmax(-1)
    wanted = labels[:, 1:]
    counted = wanted != IGNORE_INDEX
    return ((predicted == wanted) | ~counted).all(-1)
