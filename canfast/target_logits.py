"""Target-only logits: the vocabulary projection runs only at the positions whose next token is
scored, and the loss reads those rows alone.

The model's output embedding (``get_output_embeddings()``) is swapped, for the passes inside
:func:`target_only`, for one that keeps the rows of its input where the labels are scored and
projects only those. Whatever the model does to the logits afterwards elementwise (Gemma's
soft-capping, a scale) still applies. When the head's input is not aligned with the labels, it
projects every row as usual, and :func:`target_losses` reads the full logits.

Without autograd and for a plain ``nn.Linear`` head, the projection is deferred: the head returns
:class:`DeferredLogits`, which holds the scored rows of its input. If nothing touches them before
:func:`target_losses`, the loss runs fused with the projection, tile by tile (a running
logsumexp over vocabulary tiles), so the ``[K, V]`` logits and their log-softmax never exist in
full: for a 32k vocabulary they are most of a scan's memory traffic. Any operation the model
applies to them first computes them as the head would have, so the numbers stay the model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from canfast.model import IGNORE, Batch, Model


@dataclass
class HeadState:
    """Whether the last pass produced compact logits ``[K, V]`` (K scored positions)."""

    compact: bool = False


# Tile of the fused projection and loss: 256 rows x 2048 vocabulary entries is 2 MiB of float32
# logits, small enough to stay in cache between the matmul that writes it and the reductions.
ROW_TILE = 256
VOCAB_TILE = 2048


class DeferredLogits(Tensor):
    """Logits ``hidden @ weight.T + bias`` of shape ``[K, V]``, computed only when read.

    :func:`target_losses` reads the rows it holds and fuses the projection with the loss; any
    other operation computes the full logits once (exactly as the head would) and runs on them.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, hidden: Tensor, weight: Tensor, bias: Tensor | None):
        logits = Tensor._make_wrapper_subclass(
            cls,
            (hidden.shape[0], weight.shape[0]),
            dtype=hidden.dtype,
            device=hidden.device,
            requires_grad=False,
        )
        logits.hidden, logits.weight, logits.bias = hidden, weight, bias
        logits.full = None
        return logits

    def dense(self) -> Tensor:
        if self.full is None:
            self.full = torch.nn.functional.linear(self.hidden, self.weight, self.bias)
        return self.full

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def plain(value):
            return value.dense() if isinstance(value, DeferredLogits) else value

        args = [plain(a) for a in args]
        kwargs = {k: plain(v) for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, accumulate: torch.dtype
) -> Tensor:
    """Per-row ``cross_entropy(linear(hidden, weight, bias), targets)`` in ``accumulate``,
    without the ``[K, V]`` logits: tiles of rows and vocabulary entries, a running max and sum
    of exponentials per row, and each row's target logit read from the tile that holds it.

    Each tile is projected in the model's dtype and then converted, as the full logits would be,
    so the per-token terms equal those of the unfused loss up to the order of summation."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    out = torch.empty(rows, dtype=accumulate, device=hidden.device)
    for r0 in range(0, rows, ROW_TILE):
        h, y = hidden[r0 : r0 + ROW_TILE], targets[r0 : r0 + ROW_TILE]
        peak = torch.full((h.shape[0],), -torch.inf, dtype=accumulate, device=h.device)
        total = torch.zeros_like(peak)
        picked = torch.zeros_like(peak)
        for v0 in range(0, vocab, VOCAB_TILE):
            v1 = min(v0 + VOCAB_TILE, vocab)
            part = None if bias is None else bias[v0:v1]
            z = torch.nn.functional.linear(h, weight[v0:v1], part).to(accumulate)
            inside = (y >= v0) & (y < v1)
            at = (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
            picked = torch.where(inside, z.gather(1, at).squeeze(1), picked)
            new_peak = torch.maximum(peak, z.amax(dim=1))
            # -inf - -inf is NaN: while a row's logits are all -inf (a masked vocabulary), it
            # shifts by 0 and its sum stays 0.
            scale = torch.where(new_peak == peak, 1.0, torch.exp(peak - new_peak))
            shift = torch.where(new_peak == -torch.inf, 0.0, new_peak)
            total = total * scale + z.sub_(shift.unsqueeze(1)).exp_().sum(dim=1)
            peak = new_peak
        out[r0 : r0 + h.shape[0]] = total.log() + peak - picked
    return out


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
    # A subclass or a replaced forward may do more than the matmul: only a plain Linear defers.
    deferrable = type(head) is nn.Linear and previous is None

    def forward(hidden: Tensor) -> Tensor:
        if tuple(hidden.shape[:-1]) != tuple(scored.shape):
            state.compact = False
            return original(hidden)
        state.compact = True
        if deferrable and not torch.is_grad_enabled():
            return DeferredLogits(hidden[scored], head.weight, head.bias)
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
    if isinstance(logits, DeferredLogits) and logits.full is None:
        nll = linear_cross_entropy(
            logits.hidden, logits.weight, logits.bias, labels[scored], accumulate
        )
    else:
        nll = torch.nn.functional.cross_entropy(
            logits.to(accumulate), labels[scored], reduction="none"
        )
    rows = scored.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], dtype=accumulate, device=nll.device).index_add_(
        0, rows, nll
    )
