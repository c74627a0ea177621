"""Prefix reuse: run a model once, then replay it with one module's output replaced by many
variants at once, computing only what follows that module.

It works from module structure alone, with no forward written per family:

- A timeline pass ticks a counter as every module's call starts and finishes, and notes who
  called it, how many rows (first dimension of its first tensor input) it saw, and how often it
  ran.
- The *cut* of a site is every maximal module that finished before the site started: the
  embeddings, a vision tower and projector, the earlier layers, the norms and attention of the
  site's own layer, the gate and up Linears before a down site. Only modules that hold
  parameters and run once per forward are cut; the rest (rotary tables, activations, a module
  shared between encoder and decoder) are cheap or ambiguous and always run live.
- A record pass keeps a copy of the output of each cut module, and of the site's own output
  (and input, for unit ``mid``).
- A replay runs the model on the input batch tiled ``n`` times (block ``i`` = variant ``i``, the
  layout of ``Batch.repeat``). Each cut module returns its recorded output tiled instead of
  computing; the site returns the ``n`` variants; everything after runs live. Glue code between
  modules (residual adds, merging image features, masks) runs live on the tiled batch, so it
  stays consistent with the tiled inputs.

A replayed module checks that it sees ``n`` times the rows it was recorded with, so a model
whose structure changes between passes fails loudly instead of mixing rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map


def first_rows(args: tuple, kwargs: dict) -> int | None:
    """The first dimension of a call's first tensor argument (positional, then keyword)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def map_tensors(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor inside tuples, lists, dicts and
    ``ModelOutput``s."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        mapped = {k: map_tensors(v, fn) for k, v in value.items()}
        # ModelOutput is a dict subclass built from keywords; plain dicts take a mapping.
        return type(value)(**mapped) if type(value) is not dict else mapped
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value


class _Tiled(torch.Tensor):
    """A recorded tensor stacked ``times`` times, built by the first operation that reads it.

    Most cut outputs are never read in a replay: an earlier layer's output goes straight into
    the next layer, which is cut too and ignores its input. Deferring the copy spares that
    memory traffic; any aten operation (an add, an index, a kernel) sees the full tensor.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, source: Tensor, times: int):
        shape = (source.shape[0] * times, *source.shape[1:])
        tiled = torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=source.dtype, device=source.device, requires_grad=False
        )
        tiled.source = source
        tiled.times = times
        tiled.full = None
        return tiled

    def dense(self) -> Tensor:
        if self.full is None:
            self.full = self.source.repeat(self.times, *([1] * (self.source.dim() - 1)))
        return self.full

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        broadcast = _broadcast_elementwise(func, args, kwargs)
        if broadcast is not None:
            return broadcast

        def plain(value):
            return value.dense() if isinstance(value, _Tiled) else value

        return func(*tree_map(plain, args), **tree_map(plain, kwargs))


# Elementwise operations whose result at each position reads only that position of each input:
# with one tiled operand they broadcast its source over the blocks instead of copying it.
_BROADCASTABLE = {
    torch.ops.aten.add.Tensor,
    torch.ops.aten.sub.Tensor,
    torch.ops.aten.mul.Tensor,
}


def _broadcast_elementwise(func, args: tuple, kwargs: dict) -> Tensor | None:
    """``func(tiled, other)`` or ``func(other, tiled)`` as a broadcast over the blocks (the
    residual add after a replayed site reads a cut output), ``func`` of two tiled tensors as
    the tiled result of their sources, or None where that does not apply: another operation,
    shapes or dtypes that differ, or a tiled tensor already made dense."""
    if func not in _BROADCASTABLE or len(args) != 2:
        return None
    first, second = args
    if isinstance(first, _Tiled) and isinstance(second, _Tiled):
        # Two cut outputs (the residual add between a cut attention and a cut layer): the
        # result is their sum tiled, and stays lazy.
        if (
            first.full is None
            and second.full is None
            and first.times == second.times
            and first.source.shape == second.source.shape
            and first.dtype == second.dtype
        ):
            return _Tiled(func(first.source, second.source, **kwargs), first.times)
        return None
    if not isinstance(first, _Tiled) and not isinstance(second, _Tiled):
        return None
    tiled, other = (first, second) if isinstance(first, _Tiled) else (second, first)
    if (
        tiled.full is not None
        or not isinstance(other, Tensor)
        or other.shape != tiled.shape
        or other.dtype != tiled.dtype
        or other.device != tiled.device
    ):
        return None
    source = tiled.source.unsqueeze(0)
    blocks = other.reshape(tiled.times, *tiled.source.shape)
    pair = (source, blocks) if tiled is first else (blocks, source)
    return func(*pair, **kwargs).reshape(tiled.shape)


def tile(value: Any, rows: int, times: int) -> Any:
    """Every tensor of ``value`` whose first dimension is ``rows`` stacked ``times`` times,
    block-major (built lazily); tensors of another first dimension (broadcast tables) stay as
    they are."""

    def one(t: Tensor) -> Tensor:
        if t.dim() >= 1 and t.shape[0] == rows:
            return _Tiled(t, times) if times > 1 else t.clone()
        return t

    return map_tensors(value, one)


@dataclass
class Call:
    """One module's place in a forward pass."""

    path: str
    module: nn.Module
    start: int
    end: int = -1
    parent: Call | None = None
    rows: int | None = None
    count: int = 1


@dataclass
class Timeline:
    """The calls of one forward pass, by module identity."""

    calls: dict[int, Call] = field(default_factory=dict)

    def call(self, module: nn.Module) -> Call:
        found = self.calls.get(id(module))
        if found is None:
            raise RuntimeError(f"prefix reuse: {type(module).__name__} did not run in the forward")
        if found.count != 1:
            raise RuntimeError(
                f"prefix reuse: {found.path or 'the model'} runs {found.count} times per forward; "
                "a scan site must run once"
            )
        return found

    def cut(self, site: nn.Module) -> list[Call]:
        """The maximal single-call, parameter-holding modules that finish before ``site``
        starts."""
        start = self.call(site).start
        chosen = []
        for call in self.calls.values():
            if call.end < 0 or call.end >= start:
                continue
            parent = call.parent
            if parent is not None and parent.end < start:
                continue  # an enclosing module finished too: that one is the maximal one
            if call.count != 1 or call.rows is None:
                continue
            if next(call.module.parameters(), None) is None:
                continue
            chosen.append(call)
        return chosen


@contextmanager
def timeline(model: nn.Module) -> Iterator[Timeline]:
    """Record the call timeline of the forward passes run inside the block."""
    record = Timeline()
    clock = [0]
    stack: list[Call] = []
    handles = []

    def before(module, args, kwargs, path):
        clock[0] += 1
        known = record.calls.get(id(module))
        if known is not None:
            known.count += 1
            stack.append(known)
            return None
        call = Call(path, module, clock[0], parent=stack[-1] if stack else None)
        call.rows = first_rows(args, kwargs)
        record.calls[id(module)] = call
        stack.append(call)
        return None

    def after(module, args, kwargs, output):
        clock[0] += 1
        call = stack.pop()
        if call.count == 1:
            call.end = clock[0]
        return None

    for path, module in model.named_modules():
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, k, path=path: before(m, a, k, path), with_kwargs=True
            )
        )
        handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _copy(value: Any) -> Any:
    # A copy, so that glue code mutating a module's output in place cannot change the record.
    return map_tensors(value, lambda t: t.detach().clone())


@dataclass
class Record:
    """What a record pass kept: each cut module's output and input rows, the site's output and
    input, and the module a replay overrides with the variants."""

    outputs: dict[int, Any]
    rows: dict[int, int | None]
    site_output: Tensor | None = None
    site_input: Tensor | None = None
    # The outermost enclosing module that returns the site's output object itself (an FFN
    # block whose last step is its down Linear), and the rows it was called with. A replay
    # overrides that one, which spares the work that only fed the site (gate, up, act * up).
    target: nn.Module | None = None
    target_rows: int | None = None


@contextmanager
def recording(cut: list[Call], site: Call) -> Iterator[Record]:
    """Keep the outputs of the ``cut`` modules and the site's output and input during the
    forward pass inside the block."""
    with recording_sites([cut], [site]) as records:
        yield records[0]


def _site_hooks(site: Call, record: Record) -> list:
    """Hooks that keep the site's output and input, and find the outermost enclosing module
    that returns the site's output object itself."""
    raw: dict[str, Any] = {}

    def keep_site(module, args, kwargs, output):
        raw["output"] = output
        record.site_input = args[0].detach().clone()
        record.site_output = output.detach().clone()
        record.target, record.target_rows = module, first_rows(args, kwargs)

    handles = [site.module.register_forward_hook(keep_site, with_kwargs=True)]

    def lifter(below: nn.Module):
        def lift(module, args, kwargs, output):
            # Hooks fire innermost first, so each ancestor sees whether the one below lifted.
            if record.target is below and output is raw.get("output"):
                record.target, record.target_rows = module, first_rows(args, kwargs)

        return lift

    parent, below = site.parent, site.module
    while parent is not None and parent.count == 1:
        handles.append(parent.module.register_forward_hook(lifter(below), with_kwargs=True))
        parent, below = parent.parent, parent.module
    return handles


@contextmanager
def recording_sites(cuts: list[list[Call]], sites: list[Call]) -> Iterator[list[Record]]:
    """One record pass for several sites: ``records[i]`` holds what a replay of ``sites[i]``
    with cut ``cuts[i]`` needs. A module in several cuts is kept once; the records share it."""
    outputs: dict[int, Any] = {}
    rows: dict[int, int | None] = {}
    records = [Record(outputs, rows) for _ in sites]
    handles = []

    def keeper(key: int):
        def keep(module, args, kwargs, output):
            if key in outputs:
                raise RuntimeError("prefix reuse: a cut module ran twice in one forward")
            outputs[key] = _copy(output)
            rows[key] = first_rows(args, kwargs)

        return keep

    modules: dict[int, nn.Module] = {}
    for cut in cuts:
        for call in cut:
            modules[id(call.module)] = call.module
    try:
        for key, module in modules.items():
            handles.append(module.register_forward_hook(keeper(key), with_kwargs=True))
        for site, record in zip(sites, records, strict=True):
            handles += _site_hooks(site, record)
        yield records
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replaying(
    cut: list[Call], record: Record, variants: Tensor | None, times: int
) -> Iterator[None]:
    """Inside the block, a forward on the input batch tiled ``times`` times skips every cut
    module (it returns its recorded output, tiled) and the site (or the enclosing module that
    returns its output) returns ``variants``. Without ``variants`` the site and everything
    after it run live (a sweep's masks act there)."""
    installed: list[tuple[nn.Module, object]] = []

    def install(module: nn.Module, forward) -> None:
        installed.append((module, vars(module).get("forward")))
        module.forward = forward

    def tiled_forward(call: Call):
        output = record.outputs.get(id(call.module))
        recorded_rows = record.rows.get(id(call.module))
        if output is None or recorded_rows is None:
            raise RuntimeError(f"prefix reuse: no recorded output for {call.path}")
        expected = recorded_rows * times

        def forward(*args, **kwargs):
            rows = first_rows(args, kwargs)
            if rows == expected:
                return tile(output, recorded_rows, times)
            if rows == recorded_rows:
                # An input shared by the whole batch (GPT-2's position ids [1, T]) is not tiled
                # by the replay, so neither is what the module made of it.
                return output
            raise RuntimeError(
                f"prefix reuse: {call.path} got {rows} rows, expected {expected}; "
                "the model does not replay as recorded"
            )

        return forward

    def site_forward(*args, **kwargs):
        rows = first_rows(args, kwargs)
        if record.target_rows is None or rows != record.target_rows * times:
            raise RuntimeError(
                f"prefix reuse: the site got {rows} rows, expected {record.target_rows} x {times}"
            )
        return variants

    if variants is not None and record.target is None:
        raise RuntimeError("prefix reuse: the site did not run in the record pass")
    try:
        for call in cut:
            install(call.module, tiled_forward(call))
        if variants is not None:
            install(record.target, site_forward)
        yield
    finally:
        for module, previous in reversed(installed):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
