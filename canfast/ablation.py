"""Exact single-neuron ablation with prefix reuse, in blocks of neurons.

For each site and data batch, one record pass keeps what precedes the site
(:mod:`canfast.prefix`); then blocks of ``n`` neurons are ablated at once: the site's recorded
output is expanded ``n`` times with one neuron removed per copy (``ops.ablate_expand``), and only
what follows the site runs, on the batch tiled ``n`` times, with target-only logits. The block
size follows a token budget (:func:`block_tokens`); an out-of-memory error halves it and the
scan goes on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from canfast import ops, prefix
from canfast.model import Batch, Model
from canfast.objective import Objective
from canfast.sites import Site
from canfast.target_logits import model_inputs, target_losses, target_only


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


# Tokens of a block on a GPU: enough rows that each product of the replay fills the device.
GPU_BLOCK_TOKENS = 1 << 16
# Bytes of a block's widest activation on the CPU. Every elementwise step of the replay (norms,
# rotary, SiLU, the residual adds) streams a tensor this size, once per layer: kept in the last
# level cache's range and under glibc's largest mmap threshold (32 MiB, which the canfast command
# pins; see canfast.allocator), it comes from memory already mapped instead of faulting in fresh
# zeroed pages for every step. On a 49M LLaVA-shaped model (bench/scan.py) a block of 4K tokens
# (22 MB at the FFN) ran an early layer's scan 1.6x faster than one of 64K tokens (360 MB).
CPU_BLOCK_BYTES = 24 << 20


def block_tokens(model: Model) -> int:
    """The default token budget of an ablation block: :data:`GPU_BLOCK_TOKENS` on an
    accelerator; on the CPU, as many tokens as keep the widest FFN activation of the block
    (the ``mid`` width of the model's widest FFN) within :data:`CPU_BLOCK_BYTES`."""
    if model.device.type != "cpu":
        return GPU_BLOCK_TOKENS
    sites = model.all_sites("mid") or model.all_sites("out")
    per_token = max((s.channels for s in sites), default=1) * model.dtype.itemsize
    return max(1, CPU_BLOCK_BYTES // per_token)


def down_weight(site: Site) -> Tensor:
    """The site's weight in ``nn.Linear`` layout ``[out, in]``."""
    weight = site.module.weight
    return weight.t() if site.transposed else weight


class Ablator:
    """Per-sample losses of the model with single neurons removed, over fixed data batches.

    ``losses(outputs, batch) -> [rows]`` gives per-row loss sums: the target NLL summed over
    tokens for the default objective, or the objective's per-sample loss.
    """

    def __init__(
        self,
        model: Model,
        batches: Sequence[Batch],
        objective: Objective | None = None,
        backend: str = "auto",
        max_batch_tokens: int | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.batches = list(batches)
        self.objective = objective
        self.backend = backend
        if max_batch_tokens is None:
            max_batch_tokens = block_tokens(model)
        self.max_batch_tokens = max(1, int(max_batch_tokens))
        self.progress = progress
        self.block_limit: int | None = None  # lowered for good after an out-of-memory error
        self.record_limit: int | None = None  # sites per shared record pass, likewise
        self.halvings = 0
        self.ablations = 0
        self._timeline: prefix.Timeline | None = None

    # ----- losses -------------------------------------------------------------------------

    def _forward_losses(self, batch: Batch) -> Tensor:
        """Per-row losses of one forward of ``batch`` as the model stands (hooks included)."""
        custom = self.objective is not None
        with target_only(self.model, batch.labels, enabled=not custom) as head:
            outputs = self.model.hf(**model_inputs(self.model, batch), use_cache=False)
        if custom:
            return self.objective(outputs, batch).double()
        return target_losses(outputs.logits, batch.labels, head.compact).double()

    def timeline(self) -> prefix.Timeline:
        if self._timeline is None:
            with torch.no_grad(), prefix.timeline(self.model.hf) as recorded:
                self._forward_losses(self.batches[0])
            self._timeline = recorded
        return self._timeline

    # ----- blocks -------------------------------------------------------------------------

    def block_size(self, batch: Batch) -> int:
        tokens = max(1, batch.labels.numel())
        size = max(1, self.max_batch_tokens // tokens)
        return min(size, self.block_limit) if self.block_limit else size

    def ablate_block(
        self,
        batch: Batch,
        site: Site,
        cut: list[prefix.Call],
        record: prefix.Record,
        neurons: Tensor,
    ) -> Tensor:
        """Summed loss over the batch for each neuron of ``neurons`` removed alone: ``[n]``."""
        n = neurons.shape[0]
        y = record.site_output
        if site.unit == "out":
            copies = ops.ablate_expand(y, neurons, backend=self.backend)
        else:
            weight = down_weight(site)
            copies = ops.ablate_expand(y, neurons, record.site_input, weight, backend=self.backend)
        variants = copies.reshape(n * y.shape[0], *y.shape[1:])
        tiled = batch.repeat(n)
        with prefix.replaying(cut, record, variants, n):
            losses = self._forward_losses(tiled)
        return losses.reshape(n, -1).sum(dim=1)

    @torch.no_grad()
    def site_totals(self, site: Site, neurons: Tensor, bar: tqdm | None = None) -> Tensor:
        """Per neuron of ``neurons``: summed loss with it removed minus without, over every
        batch (float64, on the CPU)."""
        return self.sites_totals([(site, neurons)], bar)[0]

    @torch.no_grad()
    def sites_totals(
        self, jobs: Sequence[tuple[Site, Tensor]], bar: tqdm | None = None
    ) -> list[Tensor]:
        """:meth:`site_totals` for several sites, with one record pass per data batch shared by
        as many sites as memory allows (an out-of-memory error in a record pass halves the
        group), instead of one full forward per site and batch."""
        recorded = self.timeline()
        device = self.model.device
        # Several jobs may share a site (chunks of its neurons): it is recorded once for them.
        neurons_of = [neurons.to(device=device, dtype=torch.long) for _, neurons in jobs]
        totals = [torch.zeros(n.shape[0], dtype=torch.float64) for n in neurons_of]
        jobs_of: dict[str, list[int]] = {}
        for i, (site, _) in enumerate(jobs):
            if neurons_of[i].shape[0] > 0:
                jobs_of.setdefault(site.name, []).append(i)
        plans = {
            name: (jobs[held[0]][0], recorded.cut(jobs[held[0]][0].module))
            for name, held in jobs_of.items()
        }
        todo = list(jobs_of)
        for batch in self.batches:
            start = 0
            while start < len(todo):
                group = todo[start : start + (self.record_limit or len(todo))]
                try:
                    with prefix.recording_sites(
                        [plans[name][1] for name in group],
                        [recorded.call(plans[name][0].module) for name in group],
                    ) as records:
                        base = self._forward_losses(batch)
                except (RuntimeError, torch.OutOfMemoryError) as exc:
                    if not is_out_of_memory(exc) or len(group) == 1:
                        raise
                    self.record_limit = max(1, len(group) // 2)
                    self.halvings += 1
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                base_sum = float(base.sum())
                for name, record in zip(group, records, strict=True):
                    site, cut = plans[name]
                    if record.site_output is None:
                        raise RuntimeError(f"prefix reuse: {site.name} did not run in the forward")
                    for i in jobs_of[name]:
                        masked = self._blocks(batch, site, cut, record, neurons_of[i], bar)
                        totals[i] += masked - base_sum
                del records
                start += len(group)
        return totals

    def _blocks(
        self,
        batch: Batch,
        site: Site,
        cut: list[prefix.Call],
        record: prefix.Record,
        neurons: Tensor,
        bar: tqdm | None,
    ) -> Tensor:
        """Summed loss over ``batch`` with each of ``neurons`` removed alone, block by block."""
        masked = torch.zeros(neurons.shape[0], dtype=torch.float64)
        start = 0
        while start < neurons.shape[0]:
            size = self.block_size(batch)
            block = neurons[start : start + size]
            try:
                losses = run_block(self, batch, site, cut, record, block)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not is_out_of_memory(exc) or block.shape[0] == 1:
                    raise
                self.block_limit = max(1, block.shape[0] // 2)
                self.halvings += 1
                if self.model.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            masked[start : start + block.shape[0]] = losses.cpu()
            start += block.shape[0]
            self.ablations += block.shape[0]
            if bar is not None:
                bar.update(block.shape[0])
        return masked


def run_block(
    ablator: Ablator,
    batch: Batch,
    site: Site,
    cut: list[prefix.Call],
    record: prefix.Record,
    neurons: Tensor,
) -> Tensor:
    """One block of ablations (a module-level seam, so that tests can inject failures)."""
    return ablator.ablate_block(batch, site, cut, record, neurons)
