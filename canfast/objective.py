"""Targets (given or self-generated), teacher-forced NLL, perplexity, and greedy generation.

An objective is any callable ``(outputs, batch) -> per-sample losses [B]``. The default is the
mean negative log-likelihood of each sample's target tokens, teacher-forced. An objective always
sees one batch of samples as :meth:`canfast.Model.encode` made it, with the outputs of those
samples only: when a sweep evaluates several neuron sets in one forward pass, the objective is
called once per set, so losses that compare samples within a batch (in-batch contrastive) never
mix two sets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from canfast.adapters.encoders import IGNORE, Batch
from canfast.data import Sample, batches
from canfast.errors import BadInput
from canfast.model import Model
from canfast.target_logits import model_inputs, target_losses, target_only

Objective = Callable[[object, Batch], Tensor]
TARGETS = ("self", "given")


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample sum of target-token NLL and number of target tokens, in float32."""
    flat = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1).clamp_min(0),
        reduction="none",
    ).reshape(labels.shape)
    scored = labels != IGNORE
    return (flat * scored).sum(dim=1), scored.sum(dim=1)


def mean_nll(outputs, batch: Batch) -> Tensor:
    """The default objective: each sample's mean NLL over its target tokens."""
    if getattr(outputs, "logits", None) is None:
        raise BadInput(
            "the model has no head to score tokens with (a base model): pass a custom "
            "objective= (see canfast.objectives)"
        )
    total, count = token_nll(outputs.logits, batch.labels)
    return total / count.clamp_min(1)


@dataclass(frozen=True)
class Evaluation:
    """Corpus totals under one model state: ``ppl = exp(nll / tokens)``.

    For a custom objective, ``nll`` is the sum of per-sample losses and ``tokens`` the number of
    samples, so ``ppl`` is the exponential of the mean loss.
    """

    nll: float
    tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.nll / max(self.tokens, 1), 700.0))


@torch.no_grad()
def evaluate(
    model: Model,
    samples: Sequence[Sample],
    batch_size: int = 8,
    objective: Objective | None = None,
    masks: int = 1,
) -> list[Evaluation]:
    """Teacher-forced totals over ``samples``.

    With ``masks > 1`` each batch is stacked ``masks`` times, for a batch of masks installed with
    :func:`canfast.masked`; one :class:`Evaluation` per mask comes back. A custom ``objective``
    is then called once per mask with the unstacked batch and that mask's rows of the outputs.
    """
    encoded = (model.encode(chunk).to(model.device) for chunk in batches(samples, batch_size))
    return evaluate_batches(model, encoded, objective, masks)


@torch.no_grad()
def evaluate_batches(
    model: Model,
    encoded: Iterable[Batch],
    objective: Objective | None = None,
    masks: int = 1,
    around: Callable[[int, int], AbstractContextManager] | None = None,
) -> list[Evaluation]:
    """:func:`evaluate` over batches already encoded. ``around(i, masks)`` gives a context that
    the forward pass of batch ``i`` runs in (a sweep's prefix replay)."""
    nll = torch.zeros(masks, dtype=torch.float64)
    tokens = torch.zeros(masks, dtype=torch.long)
    for index, batch in enumerate(encoded):
        stacked = batch.repeat(masks)
        context = around(index, masks) if around is not None else nullcontext()
        if objective is None:
            # The vocabulary projection runs at target positions only.
            with context, target_only(model, stacked.labels) as head:
                outputs = model.hf(**model_inputs(model, stacked), use_cache=False)
            total = target_losses(outputs.logits, stacked.labels, head.compact)
            count = (stacked.labels != IGNORE).sum(dim=1)
        else:
            with context:
                outputs = model.forward(stacked)
            total = torch.cat(
                [
                    objective(block_outputs(outputs, i, masks, batch.size), batch).float()
                    for i in range(masks)
                ]
            )
            count = torch.ones_like(total, dtype=torch.long)
        nll += total.reshape(masks, -1).double().sum(dim=1).cpu()
        tokens += count.reshape(masks, -1).sum(dim=1).cpu()
    return [Evaluation(float(n), int(t)) for n, t in zip(nll, tokens, strict=True)]


def block_outputs(outputs, block: int, blocks: int, size: int):
    """The outputs of block ``block`` of a forward pass over ``size`` samples stacked ``blocks``
    times.

    Every tensor whose first dimension is the stacked batch is cut to the block's rows, in
    tensors, tuples and lists of tensors and model output classes alike; anything else (a
    scalar loss, say) is kept as it is.
    """
    if blocks == 1:
        return outputs

    def cut(value):
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size * blocks:
            return value[block * size : (block + 1) * size]
        if isinstance(value, tuple | list):
            return type(value)(cut(v) for v in value)
        return value

    if isinstance(outputs, dict):
        # transformers' ModelOutput is a dict whose class rebuilds from keyword arguments.
        return type(outputs)(**{key: cut(value) for key, value in outputs.items()})
    return cut(outputs)


@torch.no_grad()
def generate_answers(
    model: Model,
    samples: Sequence[Sample],
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers of the model in its current state (masked or not)."""
    if model.task == "masked":
        return [_fill_masks(model, [sample]) for sample in samples]
    answers: list[str] = []
    tok = model.tokenizer
    for chunk in batches(samples, batch_size):
        inputs = {k: v.to(model.device) for k, v in model.encode_prompts(chunk).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.hf.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tok.pad_token_id,
        )
        new = out if model.task == "seq2seq" else out[:, inputs["input_ids"].shape[1] :]
        answers += [a.strip() for a in tok.batch_decode(new, skip_special_tokens=True)]
    return answers


def _fill_masks(model: Model, samples: list[Sample]) -> str:
    """A masked LM's answer: its top token at each mask, as space-separated tokens."""
    tok = model.tokenizer
    inputs = {k: v.to(model.device) for k, v in model.encode_prompts(samples).items()}
    logits = model.hf(**inputs).logits[0]
    where = inputs["input_ids"][0] == tok.mask_token_id
    return " ".join(tok.convert_ids_to_tokens(logits[where].argmax(-1).tolist()))


def with_targets(
    model: Model,
    samples: Sequence[Sample],
    targets: str = "self",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    objective: Objective | None = None,
) -> list[Sample]:
    """Samples with the targets every loss is scored on.

    ``given`` keeps the data's reference answers (all must have one); ``self`` replaces them
    with the unmasked model's own greedy answers. A bare model (``task="base"``), or an
    objective marked ``needs_targets = False`` (those of :mod:`canfast.objectives`), takes
    the samples as they are: targets are optional then.
    """
    if targets not in TARGETS:
        raise BadInput(f"unknown targets {targets!r}; choose 'self' or 'given'")
    if model.task == "base" or not getattr(objective, "needs_targets", True):
        return list(samples)  # nothing to generate, nothing scored token by token
    if targets == "given":
        missing = sum(s.target is None for s in samples)
        if missing:
            raise BadInput(f"--targets given, but {missing} samples have no target")
        blank = sum(not s.target.strip() for s in samples)
        if blank:
            raise BadInput(f"--targets given, but {blank} samples have an empty target")
        return list(samples)
    answers = generate_answers(model, samples, max_new_tokens, batch_size)
    return [s.with_target(a) for s, a in zip(samples, answers, strict=True)]
