"""The random baseline: neuron sets of the same size drawn from the same sites."""

from __future__ import annotations

import torch

from canfast.sites import NeuronSet
from canfast.sweep.evaluator import Evaluator
from canfast.sweep.result import Curve
from canfast.sweep.trace import trace


def random_ordering(site_channels: dict[str, int], seed: int) -> NeuronSet:
    """A seeded random order of every neuron of the given sites."""
    names = list(site_channels)
    owner = torch.cat([torch.full((site_channels[n],), i) for i, n in enumerate(names)])
    channel = torch.cat([torch.arange(site_channels[n]) for n in names])
    order = torch.randperm(owner.numel(), generator=torch.Generator().manual_seed(seed))
    return NeuronSet(tuple((names[owner[i]], int(channel[i])) for i in order.tolist()))


def random_curves(
    evaluator: Evaluator,
    site_channels: dict[str, int],
    ks: list[int],
    ppl0: float,
    tau: float,
    onset: float,
    seeds: int,
) -> list[Curve]:
    """The collapse curve of one random ordering per seed, seeds 0 .. seeds - 1."""
    curves = []
    for seed in range(seeds):
        curve = trace(evaluator, random_ordering(site_channels, seed), ks, ppl0, tau, onset)
        curve.seed = seed
        curves.append(curve)
    return curves
