"""The random baseline: orderings of the same sites' neurons, one per seed, whose top-k are
neuron sets of the same size as the ranking's."""

from __future__ import annotations

import torch

from canfast.sites import NeuronSet


def random_ordering(site_channels: dict[str, int], seed: int) -> NeuronSet:
    """A seeded random order of every neuron of the given sites."""
    names = list(site_channels)
    owner = torch.cat([torch.full((site_channels[n],), i) for i, n in enumerate(names)])
    channel = torch.cat([torch.arange(site_channels[n]) for n in names])
    order = torch.randperm(owner.numel(), generator=torch.Generator().manual_seed(seed))
    return NeuronSet(tuple((names[owner[i]], int(channel[i])) for i in order.tolist()))
