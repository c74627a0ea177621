"""What every masked evaluation of a sweep shares, computed once: the encoded batches, and the
part of the forward pass that precedes the earliest site the sweep can mask.

A sweep masks neurons of a fixed pool of sites. Everything that finishes before the earliest of
them (for LLaVA's language sites: the vision tower, the projector and the embeddings) does not
depend on the mask, so one record pass per batch keeps it (:mod:`canfast.prefix`), and each pass
of ``M`` masks replays it tiled ``M`` times and computes only what follows.

Both are held in memory for the sweep's length, within ``budget`` bytes; a batch beyond the
budget is encoded again and run in full each time, which gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from canfast import prefix
from canfast.adapters.encoders import Batch
from canfast.data import Sample, batches
from canfast.model import Model
from canfast.target_logits import model_inputs

DEFAULT_BUDGET = 4 << 30


def _nbytes(value) -> int:
    total = 0

    def count(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    prefix.map_tensors(value, count)
    return total


def _main(outputs) -> torch.Tensor:
    """The output a model's loss is read from: its logits, or a bare model's hidden states."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(outputs, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return outputs[0]


class SharedWork:
    """The encoded batches of a sweep's samples and, per batch, the recorded prefix before the
    earliest site of ``sites`` (``replay=False``: no prefix, every pass runs in full)."""

    def __init__(
        self,
        model: Model,
        samples: Sequence[Sample],
        batch_size: int,
        sites: Sequence[str],
        replay: bool = True,
        budget: int = DEFAULT_BUDGET,
    ) -> None:
        self.model = model
        self.chunks = list(batches(list(samples), batch_size))
        self.sites = list(sites)
        self.replay = replay
        self.budget = budget
        self.used = 0
        self._encoded: dict[int, Batch] = {}
        self._records: dict[int, prefix.Record | None] = {}
        self._cut: list[prefix.Call] | None = None
        self._site: prefix.Call | None = None

    def batches(self) -> Iterator[Batch]:
        for index, chunk in enumerate(self.chunks):
            known = self._encoded.get(index)
            if known is not None:
                yield known
                continue
            batch = self.model.encode(chunk).to(self.model.device)
            size = _nbytes(dict(batch.inputs)) + _nbytes(batch.labels)
            if self.used + size <= self.budget:
                self._encoded[index] = batch
                self.used += size
            yield batch

    def prepare(self) -> None:
        """Record the prefix of every batch (once): with the model unmasked, so call it before
        any mask is installed."""
        if self.replay and not self._records:
            for index, batch in enumerate(self.batches()):
                if not self.replay:
                    break
                self._records[index] = self._record(batch)
                if index == 0 and not self._replays_exactly(batch, self._records[0]):
                    self.replay = False

    @torch.no_grad()
    def _replays_exactly(self, batch: Batch, record: prefix.Record | None) -> bool:
        """Whether a replay of ``batch`` stacked twice gives the logits of a full pass. Some
        models pack a batch into one sequence (Pixtral's vision tower) where the replay cannot
        see it, so the first batch is checked once and reuse is dropped if it fails."""
        if record is None:
            return True
        stacked = batch.repeat(2)
        full = _main(self.model.hf(**model_inputs(self.model, stacked), use_cache=False))
        try:
            with prefix.replaying(self._cut, record, None, 2):
                replayed = _main(
                    self.model.hf(**model_inputs(self.model, stacked), use_cache=False)
                )
        except RuntimeError:
            return False
        return replayed.shape == full.shape and bool(
            torch.allclose(replayed.float(), full.float(), rtol=1e-4, atol=1e-5)
        )

    def around(self, index: int, masks: int) -> AbstractContextManager:
        """The context that the forward pass of batch ``index``, stacked ``masks`` times, runs
        in: a replay of its recorded prefix, or nothing."""
        record = self._records.get(index) if self.replay else None
        if record is None:
            return nullcontext()
        return prefix.replaying(self._cut, record, None, masks)

    # ----- the prefix ------------------------------------------------------------------

    @torch.no_grad()
    def _forward(self, batch: Batch) -> None:
        self.model.hf(**model_inputs(self.model, batch), use_cache=False)

    def _record(self, batch: Batch) -> prefix.Record | None:
        if self._cut is None and not self._find_cut(batch):
            return None
        # The cut lies before every site a mask can touch: it is the same under every mask.
        with prefix.recording_sites([self._cut], [self._site]) as records:
            self._forward(batch)
        record = records[0]
        record.site_output = record.site_input = None  # the site runs live in a replay
        size = _nbytes(record.outputs)
        if self.used + size > self.budget:
            return None
        self.used += size
        return record

    def _find_cut(self, batch: Batch) -> bool:
        """The cut before the earliest site of the pool, from one timeline pass; False (and no
        reuse) when the model's structure does not allow it."""
        if not self.sites:
            self.replay = False
            return False
        with torch.no_grad(), prefix.timeline(self.model.hf) as recorded:
            self._forward(batch)
        try:
            calls = [recorded.call(self.model.site(name).module) for name in self.sites]
        except RuntimeError:
            self.replay = False  # a site that runs more than once, or not at all
            return False
        self._site = min(calls, key=lambda call: call.start)
        self._cut = recorded.cut(self._site.module)
        if not self._cut:
            self.replay = False
            return False
        return True
