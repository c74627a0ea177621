"""Objectives for models without a token head: sentence encoders and other bare models.

An objective is any callable ``(outputs, batch) -> per-sample losses [B]`` (see
:mod:`canfast.objective`). The two here go together for a sentence encoder loaded with
``canfast.load(path, task="base")``:

- :func:`contrastive`: the in-batch contrastive loss such encoders are trained with, to score
  neurons with (it has a gradient at the unmasked model);
- :func:`embedding_drift`: ``1 - cos(masked, unmasked)`` of each sample's sentence embedding, to
  sweep with (it is 0 for the unmasked model and says how far masking moved each embedding).

Both pool the last hidden state into one embedding per sample with :func:`sentence_embedding`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from canfast.data import Sample, batches
from canfast.errors import BadInput
from canfast.model import Batch, Model

POOLINGS = ("mean", "cls")


def _hidden(outputs) -> Tensor:
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        hidden = getattr(outputs, "encoder_last_hidden_state", None)
    if hidden is None:
        raise BadInput(
            "this objective needs the model's last hidden state: load the bare encoder with "
            "task='base' (--task base)"
        )
    return hidden


def sentence_embedding(outputs, batch: Batch, pooling: str = "mean") -> Tensor:
    """One embedding per sample ``[B, H]`` in float32: the mean of the last hidden state over
    the sample's real tokens (``mean``, as sentence-transformers pools), or its first token
    (``cls``)."""
    if pooling not in POOLINGS:
        raise BadInput(f"unknown pooling {pooling!r}; choose {' or '.join(POOLINGS)}")
    hidden = _hidden(outputs).float()
    if pooling == "cls":
        return hidden[:, 0]
    valid = batch.valid.get("language")
    if valid is None:
        valid = batch.inputs["attention_mask"].bool()
    weights = valid.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def contrastive(outputs, batch: Batch, temperature: float = 0.05, pooling: str = "mean") -> Tensor:
    """In-batch contrastive loss (InfoNCE), one value per sample.

    Samples come in pairs, in order: rows ``2p`` and ``2p + 1`` of a batch are an anchor and
    its positive (a sentence and its paraphrase, a query and its answer). Each row's loss is
    ``-log softmax_j(cos(e_row, e_j) / temperature)`` at its partner, over every other row of
    the batch. A collapsed encoder, whose embeddings are all alike, scores ``ln(B - 1)`` for a
    batch of ``B`` rows: the loss cannot rise further than that on average. Keep the batch
    size even, and the number of samples too, so that batches never split a pair.

    The loss couples the samples of a batch: each sample's gradient depends on the others', and
    the batch (its size and which samples share it) is part of the objective.
    """
    rows = _hidden(outputs).shape[0]
    if rows % 2 or rows < 2:
        raise BadInput(
            f"the contrastive objective pairs consecutive samples, but a batch has {rows} "
            "rows; use an even batch size and an even number of samples"
        )
    embedding = F.normalize(sentence_embedding(outputs, batch, pooling), dim=-1)
    logits = embedding @ embedding.T / temperature
    self_pair = torch.eye(rows, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    partner = torch.arange(rows, device=logits.device) ^ 1
    return F.cross_entropy(logits, partner, reduction="none")


contrastive.needs_targets = False  # it reads embeddings: samples need no target


class EmbeddingDrift:
    """``1 - cos(e_masked, e_unmasked)`` per sample: the objective :func:`embedding_drift`
    returns. It holds each sample's unmasked embedding, keyed by the sample's token ids, so it
    finds the reference of any row, whatever the batch and its order."""

    __name__ = "embedding_drift"
    needs_targets = False

    def __init__(self, references: dict[tuple[int, ...], Tensor], pooling: str) -> None:
        self.references = references
        self.pooling = pooling

    @staticmethod
    def keys(batch: Batch) -> list[tuple[int, ...]]:
        ids = batch.inputs["input_ids"]
        valid = batch.valid.get("language")
        if valid is None:
            valid = batch.inputs["attention_mask"].bool()
        return [tuple(row[keep].tolist()) for row, keep in zip(ids, valid, strict=True)]

    def __call__(self, outputs, batch: Batch) -> Tensor:
        embedding = sentence_embedding(outputs, batch, self.pooling)
        try:
            reference = torch.stack([self.references[key] for key in self.keys(batch)])
        except KeyError:
            raise BadInput(
                "embedding_drift got a sample it has no unmasked embedding for; build it "
                "with the samples you sweep"
            ) from None
        reference = reference.to(embedding.device)
        return 1.0 - F.cosine_similarity(embedding, reference, dim=-1)


@torch.no_grad()
def embedding_drift(
    model: Model, samples: Sequence[Sample], batch_size: int = 8, pooling: str = "mean"
) -> EmbeddingDrift:
    """The drift objective for ``samples``: it embeds them once now, with the model as it is
    (build it before masking anything), and later scores ``1 - cos(masked, unmasked)``.

    Drift is 0 for the unmasked model, where its gradient is 0 too: sweep with it, and score
    with :func:`contrastive`. It never exceeds 2, so collapse is an absolute rise of the mean
    loss (``criterion="delta"``), not a perplexity ratio.
    """
    if pooling not in POOLINGS:
        raise BadInput(f"unknown pooling {pooling!r}; choose {' or '.join(POOLINGS)}")
    references: dict[tuple[int, ...], Tensor] = {}
    for chunk in batches(samples, batch_size):
        batch = model.encode(chunk).to(model.device)
        embedding = sentence_embedding(model.forward(batch), batch, pooling).cpu()
        for key, row in zip(EmbeddingDrift.keys(batch), embedding, strict=True):
            references[key] = row
    return EmbeddingDrift(references, pooling)


__all__ = ["EmbeddingDrift", "contrastive", "embedding_drift", "sentence_embedding"]
