"""Masking neurons: one set, or a batch of sets evaluated side by side.

``mode="hook"`` swaps each affected Linear's forward for :func:`canfast.ops.masked_linear`;
``mode="weight"`` zeroes weight rows (unit ``out``) or columns (unit ``mid``) and their bias
entries, and puts the saved values back on exit. Both give the same outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from canfast import ops
from canfast.errors import BadInput
from canfast.model import Model
from canfast.sites import NeuronSet, Site

MODES = ("hook", "weight")


def _as_sets(neurons) -> tuple[list[NeuronSet], bool]:
    """Normalize to a list of NeuronSets; the flag says whether a batch of masks was given."""
    if isinstance(neurons, NeuronSet):
        return [neurons], False
    neurons = list(neurons)
    if neurons and all(isinstance(n, NeuronSet) for n in neurons):
        return neurons, True
    if all(isinstance(n, str) for n in neurons):
        return [NeuronSet.from_ids(neurons)], False
    if all(isinstance(n, tuple) for n in neurons):
        return [NeuronSet(tuple(neurons))], False
    raise TypeError("neurons must be a NeuronSet, neuron ids, (site, channel) pairs or NeuronSets")


def build_masks(model: Model, sets: Sequence[NeuronSet]) -> dict[Site, Tensor]:
    """Per affected site, a keep-mask of ones with zeros at masked channels: ``[M, C]``."""
    masks: dict[Site, Tensor] = {}
    sites = {}
    for i, neuron_set in enumerate(sets):
        for site_name, channels in neuron_set.by_site().items():
            if site_name not in sites:
                sites[site_name] = model.site(site_name)
            site = sites[site_name]
            if max(channels) >= site.channels:
                raise BadInput(
                    f"{site_name} has {site.channels} channels; got channel {max(channels)}"
                )
            if site not in masks:
                masks[site] = torch.ones(len(sets), site.channels, dtype=model.dtype)
            masks[site][i, channels] = 0
    return masks


def _weight(module: nn.Module) -> Tensor:
    """The weight in nn.Linear layout [out, in] (Conv1D stores the transpose)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


@contextmanager
def masked(
    model: Model,
    neurons,
    unit: str | None = None,
    mode: str = "hook",
    backend: str = "auto",
) -> Iterator[Model]:
    """Mask ``neurons`` inside the ``with`` block, and restore the model exactly on exit.

    ``neurons`` is a NeuronSet, a list of ids like ``"language.3.down:17"``, or a list of
    NeuronSets: a batch of masks, where the model's input batch must be the inputs stacked once
    per set (``Batch.repeat``), block ``m`` being masked by set ``m``. Batches of masks need
    ``mode="hook"``.
    """
    if mode not in MODES:
        raise BadInput(f"unknown mask mode {mode!r}; choose 'hook' or 'weight'")
    sets, batched = _as_sets(neurons)
    masks = build_masks(model, sets)
    for site in masks:
        if unit is not None and site.unit != unit:
            raise BadInput(f"neuron site {site.name} is not of unit {unit!r}")
    if mode == "weight" and batched and len(sets) > 1:
        raise BadInput("a batch of masks needs mode='hook'")
    restore = _install_hooks(masks, batched, backend) if mode == "hook" else _zero_weights(masks)
    try:
        yield model
    finally:
        restore()


def _both(outer: Tensor | None, inner: Tensor | None) -> Tensor | None:
    """The product of two keep-masks ([C] or [M, C]); None means no mask."""
    if outer is None or inner is None:
        return inner if outer is None else outer
    if outer.dim() == inner.dim() == 2 and outer.shape[0] != inner.shape[0]:
        raise BadInput(
            f"nested batches of masks differ in size: {outer.shape[0]} and {inner.shape[0]} sets"
        )
    return outer * inner


def _install_hooks(masks: dict[Site, Tensor], batched: bool, backend: str):
    installed: list[tuple[nn.Module, object]] = []

    def restore() -> None:
        for module, previous in reversed(installed):
            if previous is None:
                del module.forward
            else:
                module.forward = previous

    try:
        for site, mask in masks.items():
            module = site.module
            keep = (mask if batched else mask[0]).to(module.weight.device)
            out_mask, in_mask = (keep, None) if site.unit == "out" else (None, keep)
            # A mask already installed on this module stays in force: an enclosing ``masked``,
            # or the other unit of the same down projection (``.down`` and ``.mid`` neurons).
            previous = vars(module).get("forward")
            outer_out, outer_in = getattr(previous, "canfast_masks", (None, None))
            out_mask, in_mask = _both(outer_out, out_mask), _both(outer_in, in_mask)

            def forward(x: Tensor, module=module, out_mask=out_mask, in_mask=in_mask) -> Tensor:
                # One packed sequence may hold every image of the batch (Pixtral): the blocks
                # of a batch of masks then follow each other along it.
                packed = batched and x.dim() == 3 and x.shape[0] == 1
                y = ops.masked_linear(
                    x[0] if packed else x,
                    _weight(module),
                    module.bias,
                    out_mask,
                    in_mask,
                    backend=backend,
                )
                return y[None] if packed else y

            forward.canfast_masks = (out_mask, in_mask)
            # An instance attribute shadows the class's forward; deleting it restores the
            # original.
            module.forward = forward
            installed.append((module, previous))
    except BaseException:
        restore()
        raise
    return restore


@torch.no_grad()
def _zero_weights(masks: dict[Site, Tensor]):
    saved: list[tuple[Tensor, Tensor, Tensor]] = []
    for site, mask in masks.items():
        channels = (mask[0] == 0).nonzero().flatten().to(site.module.weight.device)
        weight = _weight(site.module)  # a view: writes reach the parameter
        if site.unit == "out":
            saved.append((weight, channels, weight[channels].clone()))
            weight[channels] = 0
            bias = site.module.bias
            if bias is not None:
                saved.append((bias, channels, bias[channels].clone()))
                bias[channels] = 0
        else:
            columns = weight.t()
            saved.append((columns, channels, columns[channels].clone()))
            columns[channels] = 0

    @torch.no_grad()
    def restore() -> None:
        for tensor, channels, values in reversed(saved):
            tensor[channels] = values

    return restore
