"""Teacher-forced training batches for the built-in models.

Prompt and target ids come from canfast's own encoder for the family
(:mod:`canfast.adapters.encoders`: its template, its join of prompt and target, ``</s>``), so the
built-in models are trained on exactly what they are later scored and masked on. Only the
padding layouts are the trainer's own: it pads the same rows in several ways so that the models
do not depend on who batches them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from canfast.adapters.encoders import IGNORE
from canfast.data import Sample
from canfast.errors import BadInput

if TYPE_CHECKING:
    import torch
    from PIL import Image

FAMILIES = ("llava", "instructblip")
_ALIASES = {"tiny-llava": "llava", "tiny-instructblip": "instructblip"}


def family_of(name: str) -> str:
    """``"llava"`` or ``"instructblip"`` from a family, built-in model name or model_type."""
    family = _ALIASES.get(name, name)
    if family not in FAMILIES:
        valid = ", ".join([*FAMILIES, *_ALIASES])
        raise BadInput(f"unknown model family {name!r}; valid: {valid}")
    return family


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
        from canfast.adapters import adapter_for

        self.encoder = adapter_for(family).encoder(processor, "causal")
        self.image = image
        self._prompts: dict[str, tuple[list[int], list[int] | None]] = {}
        self._targets: dict[tuple[str, str], list[int]] = {}

    def prompt(self, prompt: str) -> tuple[list[int], list[int] | None]:
        """The language model's ids of the formatted prompt, and the Q-Former's (or None)."""
        if prompt not in self._prompts:
            sample = Sample(self.image, prompt)
            encoding = self.encoder.process(sample, self.encoder.prompt_text(sample))
            qformer = encoding.get("qformer_input_ids")
            self._prompts[prompt] = (
                encoding["input_ids"][0].tolist(),
                qformer[0].tolist() if qformer is not None else None,
            )
        return self._prompts[prompt]

    def encode(self, prompt: str, target: str) -> Encoded:
        prompt_ids, qformer_ids = self.prompt(prompt)
        key = (prompt, target)
        if key not in self._targets:
            text = self.encoder.prompt_text(Sample(None, prompt))
            replaced, ids = self.encoder.target_ids(text, target)
            if replaced:
                raise ValueError(f"the built-in vocabulary splits {prompt!r} from {target!r}")
            self._targets[key] = [*ids, *self.encoder.eos()]
        return Encoded(prompt_ids, self._targets[key], qformer_ids)


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
    labels = torch.full((len(encoded), length), IGNORE, dtype=torch.long)
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


def teacher_forced_exact(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sample: is every target token (and ``</s>``) the argmax given the tokens before it?

    This is exactly "greedy decoding reproduces the target and stops", at the cost of one
    forward pass instead of one per generated token.
    """
    predicted = logits[:, :-1].argmax(-1)
    wanted = labels[:, 1:]
    counted = wanted != IGNORE
    return ((predicted == wanted) | ~counted).all(-1)
