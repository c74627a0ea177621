"""Masking neurons: one set, or a batch of sets evaluated side by side.

``mode="hook"`` routes each affected Linear through :func:`canfast.ops.masked_linear` (a
:class:`Route`, which scoring uses too, to attach its score sinks);
``mode="weight"`` zeroes weight rows (unit ``out``) or columns (unit ``mid``) and their bias
entries, and puts the saved values back on exit. Both give the same outputs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

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


class Route:
    """How one Linear runs while canfast holds it: through :func:`canfast.ops.masked_linear`
    with the masks of every layer installed on it, composed by product, and at most one score
    sink.

    Layers come and go in nested order (an enclosing ``masked``, the other unit of the same
    down projection, a scoring run). Hooks cannot stop a module's own product, so the route
    itself is what the module calls: it is set as the instance's ``forward``, which shadows the
    class method, while any layer is installed, and deleted with the last one, which restores
    the module exactly.
    """

    def __init__(self, module: nn.Module, transposed: bool) -> None:
        self.module = module
        self.transposed = transposed
        self.layers: list[RouteLayer] = []
        self.compose()

    def compose(self) -> None:
        """Fold the installed layers into what each call uses, once per install or removal
        rather than once per call. Raises BadInput (changing nothing) when they do not
        compose."""
        out_mask = in_mask = None
        sinks = None
        for layer in self.layers:
            out_mask = _both(out_mask, layer.out_mask)
            in_mask = _both(in_mask, layer.in_mask)
            sinks = layer.sinks or sinks
        self.out_mask, self.in_mask, self.sinks = out_mask, in_mask, sinks
        self.backend = self.layers[-1].backend if self.layers else "auto"
        self.batched = any(m is not None and m.dim() == 2 for m in (out_mask, in_mask))
        self.plan: ops.LinearPlan | None = None
        self.planned_for: tuple = ()
        if self.layers:
            # Planned now, while the host is warm: made by the first call instead, inside a
            # pass, each plan costs tens of microseconds, once per site and run.
            try:
                self._plan()
            except (ValueError, RuntimeError):
                self.plan = None  # raised again by the call, where it always was

    def _plan(self) -> ops.LinearPlan:
        """The checked op for the module's current weight and bias: made again when either is
        replaced or moved (``param.data = ...``, ``.to()``); writes in place need nothing."""
        weight, bias = self.module.weight, self.module.bias
        # The plan holds the weight's and bias's storage, so no other tensor can take over an
        # identity and an address both while it lives.
        key = (id(weight), weight.data_ptr(), id(bias), bias.data_ptr() if bias is not None else 0)
        if self.plan is None or key != self.planned_for:
            self.plan = ops.LinearPlan.of(
                weight.t() if self.transposed else weight,
                bias,
                self.out_mask,
                self.in_mask,
                backend=self.backend,
            )
            self.planned_for = key
        return self.plan

    def __call__(self, x: Tensor) -> Tensor:
        if self.batched and x.dim() == 3 and x.shape[0] == 1:
            # One packed sequence holds every image of the batch (Pixtral): the blocks of a
            # batch of masks follow each other along it.
            return self(x[0])[None]
        sinks = self.sinks
        if sinks is None:
            return self._plan()(x)
        return self._plan().feed(x, sinks.open(x))


class SinkSource(Protocol):
    """Gives a routed Linear a fresh score sink for each call (see :mod:`canfast.score`), made
    for that call's input: the route does not check it again (:meth:`LinearPlan.feed`)."""

    def open(self, x: Tensor) -> ops.ScoreSink: ...


@dataclass(eq=False)
class RouteLayer:
    """One installer's part of a route: keep-masks (None: none) and/or a sink source."""

    out_mask: Tensor | None = None
    in_mask: Tensor | None = None
    sinks: SinkSource | None = None
    backend: str = "auto"


_ROUTES: weakref.WeakKeyDictionary[nn.Module, Route] = weakref.WeakKeyDictionary()


def route(site: Site, layer: RouteLayer) -> Callable[[], None]:
    """Install ``layer`` on ``site``'s Linear; return the function that removes it.

    Raises BadInput (and installs nothing) when its masks do not compose with those in force.
    """
    module = site.module
    current = _ROUTES.get(module)
    if current is None:
        current = Route(module, site.transposed)
    if layer.sinks is not None and current.sinks is not None:
        raise BadInput(f"{site.name} is already being scored")
    current.layers.append(layer)
    try:
        current.compose()
    except BaseException:
        current.layers.pop()
        current.compose()
        raise
    if len(current.layers) == 1:
        _ROUTES[module] = current
        # An instance attribute shadows the class's forward; deleting it restores the original.
        module.forward = current

    def remove() -> None:
        current.layers.remove(layer)
        current.compose()
        if not current.layers:
            del module.forward
            _ROUTES.pop(module, None)

    return remove


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
    removers: list[Callable[[], None]] = []

    def restore() -> None:
        for remove in reversed(removers):
            remove()

    try:
        for site, mask in masks.items():
            keep = (mask if batched else mask[0]).to(site.module.weight.device)
            out_mask, in_mask = (keep, None) if site.unit == "out" else (None, keep)
            removers.append(route(site, RouteLayer(out_mask, in_mask, backend=backend)))
    except BaseException:
        restore()
        raise
    return restore


@torch.no_grad()
def _zero_weights(masks: dict[Site, Tensor]):
    saved: list[tuple[Tensor, Tensor, Tensor]] = []
    for site, mask in masks.items():
        channels = (mask[0] == 0).nonzero().flatten().to(site.module.weight.device)
        # A view in nn.Linear layout: writes reach the parameter.
        weight = site.module.weight.t() if site.transposed else site.module.weight
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
