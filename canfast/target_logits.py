"""Target-only logits: the vocabulary projection runs only at the positions whose next token is
scored, and the loss reads those rows alone.

The model's output embedding (``get_output_embeddings()``) is swapped, for the passes inside
:func:`target_only`, for one that keeps the rows of its input where the labels are scored and
projects only those. Whatever the model does to the logits afterwards elementwise (Gemma's
soft-capping, a scale) still applies. When the head's input is not aligned with the labels, it
projects every row as usual, and :func:`target_losses` reads the full logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from canfast.model import IGNORE, Batch, Model


@dataclass
class HeadState:
    """Whether the last pass produced compact logits ``[K, V]`` (K scored positions)."""

    compact: bool = False


def model_inputs(model: Model, batch: Batch) -> dict[str, Tensor]:
    """The forward's inputs, with an encoder-decoder's labels turned into decoder inputs so
    that the model does not compute a loss over full logits itself."""
    inputs = dict(batch.inputs)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    prepare = getattr(model.hf, "prepare_decoder_input_ids_from_labels", None)
    if "labels" in inputs and prepare is not None:
        inputs["decoder_input_ids"] = prepare(labels=inputs.pop("labels"))
    return inputs


@contextmanager
def target_only(model: Model, labels: Tensor, enabled: bool = True) -> Iterator[HeadState]:
    """Inside the block, the output embedding projects only rows where ``labels`` are scored."""
    state = HeadState()
    head = model.hf.get_output_embeddings() if enabled else None
    if head is None:
        yield state
        return
    previous = vars(head).get("forward")
    original = previous if previous is not None else type(head).forward.__get__(head)
    scored = labels != IGNORE

    def forward(hidden: Tensor) -> Tensor:
        if tuple(hidden.shape[:-1]) != tuple(scored.shape):
            state.compact = False
            return original(hidden)
        state.compact = True
        return original(hidden[scored])

    head.forward = forward
    try:
        yield state
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def target_losses(logits: Tensor, labels: Tensor, compact: bool) -> Tensor:
    """Per-row sums of target-token NLL, ``[R]``, in float64 for float64 logits and float32
    otherwise. ``logits`` are compact ``[K, V]`` or full ``[R, T, V]``."""
    scored = labels != IGNORE
    if not compact:
        logits = logits[scored]
    elif logits.shape[0] != int(scored.sum()):
        raise RuntimeError("target-only logits: rows do not match the scored positions")
    accumulate = torch.float64 if logits.dtype == torch.float64 else torch.float32
    nll = torch.nn.functional.cross_entropy(logits.to(accumulate), labels[scored], reduction="none")
    rows = scored.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], dtype=accumulate, device=nll.device).index_add_(
        0, rows, nll
    )
