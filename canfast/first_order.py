"""The first-order estimate of every neuron's ablation effect, from one backward per batch.

Removing neuron ``j`` moves its activation ``a`` to zero, so to first order the loss changes by
``-(a * dL/da)`` summed over positions (attribution patching). ``L`` is the corpus mean the exact
scan reports: summed target NLL over all target tokens, or for a custom objective the mean loss
over samples. A zero "probe" leaf added to each site's activation receives ``dL/da`` without
cutting the graph, so every site of a batch shares one backward.

:func:`estimate_and_can` gives the estimate and the CAN scores from one backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from canfast.model import IGNORE, Batch, Model
from canfast.objective import Objective
from canfast.score import _HookCollector, check_signal, image_rows
from canfast.sites import Site
from canfast.target_logits import model_inputs, target_losses, target_only


class _Probes:
    def __init__(self, sites: Sequence[Site]) -> None:
        self.sites = list(sites)
        self.seen: dict[str, tuple[Tensor, Tensor]] = {}
        self.handles = []

    def _probe(self, site: Site, a: Tensor) -> Tensor:
        probe = torch.zeros_like(a, requires_grad=True)
        self.seen[site.name] = (a.detach(), probe)
        return a + probe

    def __enter__(self) -> _Probes:
        for site in self.sites:
            if site.unit == "out":

                def hook(module, args, output, site=site):
                    return self._probe(site, output)

                self.handles.append(site.module.register_forward_hook(hook))
            else:

                def pre(module, args, site=site):
                    return (self._probe(site, args[0]), *args[1:])

                self.handles.append(site.module.register_forward_pre_hook(pre))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def _valid_rows(site: Site, batch: Batch, a: Tensor) -> Tensor | None:
    """The padding mask for ``a``'s positions (``[..., C]``), shaped like ``a[..., 0]``."""
    valid = batch.valid.get(site.stream) if site.stream else None
    if valid is None:
        return None
    if tuple(valid.shape) == tuple(a.shape[:-1]):
        return valid
    if valid.numel() == a[..., 0].numel():
        return valid.reshape(a.shape[:-1])
    return None


def first_order(
    model: Model,
    batches: Sequence[Batch],
    sites: Sequence[Site],
    normalizer: float,
    objective: Objective | None = None,
) -> dict[str, Tensor]:
    """Per site, ``-(a * dL/da)`` summed over every valid position of every batch (float64),
    with ``L`` the corpus sum of losses divided by ``normalizer``."""
    totals = {s.name: torch.zeros(s.channels, dtype=torch.float64) for s in sites}
    trainable = [p.requires_grad for p in model.hf.parameters()]
    model.hf.requires_grad_(False)
    try:
        with torch.enable_grad():
            for batch in batches:
                with _Probes(sites) as probes:
                    custom = objective is not None
                    with target_only(model, batch.labels, enabled=not custom) as head:
                        outputs = model.hf(**model_inputs(model, batch), use_cache=False)
                    if custom:
                        losses = objective(outputs, batch)
                    else:
                        losses = target_losses(outputs.logits, batch.labels, head.compact)
                    loss = losses.sum() / normalizer
                    probed = [p for _, p in probes.seen.values()]
                    grads = torch.autograd.grad(loss, probed, allow_unused=True)
                for (name, (a, _)), g in zip(probes.seen.items(), grads, strict=True):
                    if g is None:
                        continue  # the loss does not depend on this site
                    site = next(s for s in sites if s.name == name)
                    effect = -(a.double() * g.double())
                    valid = _valid_rows(site, batch, a)
                    if valid is not None:
                        effect = torch.where(valid.unsqueeze(-1), effect, 0.0)
                    totals[name] += effect.reshape(-1, effect.shape[-1]).sum(0).cpu()
    finally:
        for p, flag in zip(model.hf.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
    return totals


class _EstimateAndCan(_HookCollector):
    """The hook path of CAN scoring that also sums ``-(a * dL/da)`` per sample.

    The backward is that of CAN's loss (the sum of per-sample losses); the estimate's loss is
    the corpus sum over ``normalizer``. For per-sample losses the two gradients at sample
    ``i``'s rows differ by one factor, ``weights[i]``, so one backward serves both.
    """

    def __init__(self, sites: Sequence[Site], alpha: float, backend: str) -> None:
        super().__init__(sites, alpha, backend)
        self.estimate = {s.name: torch.zeros(s.channels, dtype=torch.float64) for s in sites}
        self.weights: Tensor | None = None

    def reduce(self, site: Site, a: Tensor, g: Tensor) -> None:
        super().reduce(site, a, g)
        rows = self.rows(site, a.shape[:-1])
        channels = a.shape[-1]
        effect = -(a.double() * g.double()).reshape(rows.samples, rows.steps, channels)
        if rows.valid is not None:
            effect = torch.where(rows.valid.to(effect.device).unsqueeze(-1), effect, 0.0)
        per_group = effect.sum(1)
        weights = self.weights.to(per_group.device)
        if rows.owner is not None:
            owner = rows.owner.to(per_group.device)
            per_group = per_group.new_zeros(weights.shape[0], channels).index_add_(
                0, owner, per_group
            )
        elif per_group.shape[0] != weights.shape[0]:
            if not bool((weights == weights[0]).all()):
                raise RuntimeError(
                    f"first-order estimate: {site.name} runs {per_group.shape[0]} row groups "
                    f"for {weights.shape[0]} samples, and the samples weigh differently"
                )
            weights = weights[:1].expand(per_group.shape[0])
        self.estimate[site.name] += (per_group * weights.double().unsqueeze(1)).sum(0).cpu()


def estimate_and_can(
    model: Model,
    batches: Sequence[Batch],
    sites: Sequence[Site],
    normalizer: float,
    alpha: float,
    objective: Objective | None = None,
    backend: str = "auto",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """:func:`first_order` and the CAN scores :func:`canfast.score` gives (hook path, targets
    given) on the same batches, from one forward and backward per batch instead of two.

    The backward is CAN's: the sum over samples of each sample's mean target NLL (or of the
    objective). At sample ``i``'s rows the estimate's gradient is that one times
    ``max(T_i, 1) / normalizer`` (``T_i`` its target tokens), or ``1 / normalizer`` for a
    custom objective: exact for per-sample losses, the case CAN is defined for. Target-only
    logits make the backward cheaper than ``score``'s over full logits.

    Returns ``(estimate, can)``: float64 estimates per site, and float32 CAN scores per site.
    """
    custom = objective is not None
    totals = [0, 0.0]  # target tokens, sum of |loss|
    trainable = [p.requires_grad for p in model.hf.parameters()]
    model.hf.requires_grad_(False)
    try:
        with _EstimateAndCan(sites, alpha, backend) as collector, torch.enable_grad():
            for batch in batches:
                collector.batch = batch
                collector.images = image_rows(model, batch)
                with target_only(model, batch.labels, enabled=not custom) as head:
                    outputs = model.hf(**model_inputs(model, batch), use_cache=False)
                if custom:
                    losses = objective(outputs, batch)
                    collector.weights = torch.full((batch.size,), 1.0 / normalizer)
                else:
                    counts = (batch.labels != IGNORE).sum(dim=1)
                    sums = target_losses(outputs.logits, batch.labels, head.compact)
                    losses = sums / counts.clamp_min(1).to(sums.dtype)
                    collector.weights = counts.clamp_min(1).double() / normalizer
                totals[0] += int(batch.target_mask.sum())
                totals[1] += float(losses.detach().abs().sum())
                total = losses.sum()
                if total.requires_grad:
                    total.backward()
                collector.finish_batch()
    finally:
        for p, flag in zip(model.hf.parameters(), trainable, strict=True):
            p.requires_grad_(flag)
    results = collector.totals.results()
    can = {s.name: results[s.name][0] for s in sites}
    check_signal(can, not custom, *totals)
    return collector.estimate, can
