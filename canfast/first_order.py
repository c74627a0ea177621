"""The first-order estimate of every neuron's ablation effect, from one backward per batch.

Removing neuron ``j`` moves its activation ``a`` to zero, so to first order the loss changes by
``-(a * dL/da)`` summed over positions (attribution patching). ``L`` is the corpus mean the exact
scan reports: summed target NLL over all target tokens, or for a custom objective the mean loss
over samples. A zero "probe" leaf added to each site's activation receives ``dL/da`` without
cutting the graph, so every site of a batch shares one backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from canfast.model import Batch, Model
from canfast.objective import Objective
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
