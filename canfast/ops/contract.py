"""Each op of canfast declared once: signature, checks, error texts and autograd.

The public functions check their arguments, bring them into the canonical form every backend
takes (see :class:`canfast.ops.registry.Backend`), and call a ``torch.library`` custom op that
runs the chosen backend's kernel. The custom ops carry fake (meta) implementations, so the ops
trace under ``torch.compile``, and ``masked_linear`` has its one autograd formula here: a
masked linear layer whose backward gives ``dL/dx`` only (weights are frozen) and, with a
:class:`ScoreSink`, adds the CAN score of the layer's output (unit ``out``: ``y`` and ``dL/dy``)
or input (unit ``mid``: ``x`` and ``dL/dx``, in the epilogue of the ``dL/dx`` product). Where
that formula is torch's own (no masks, on a backend whose products are torch's), an eager call
runs as torch's product and the sink is fed from a hook on its backward node (see
:class:`LinearPlan`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from canfast.ops.registry import ScoreFeed, by_name, kernels_for

UNITS = ("out", "mid")
_FED_TWICE = (
    "a score sink is fed by one backward pass: this graph, kept with retain_graph, fed it already"
)


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float, or ValueError unless it lies in [0, 1]."""
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return alpha


def _check_tensors(op: str, **tensors: Tensor | None) -> None:
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{op}: tensors on {device} and {t.device}; put them on one device")


def _check_valid(
    valid: Tensor | None, samples: int, steps: int, name: str = "valid"
) -> Tensor | None:
    if valid is None:
        return None
    if valid.shape != (samples, steps):
        raise ValueError(f"{name} must be [{samples}, {steps}], got {tuple(valid.shape)}")
    if valid.dtype.is_floating_point or valid.is_complex():
        raise ValueError(f"{name} must be a bool (or integer 0/1) mask, got {valid.dtype}")
    return valid if valid.dtype == torch.bool else valid != 0


# ----------------------------------------------------------------------------------------------
# score_accumulate


def _eager(op: torch.library.CustomOpDef, impl: Callable) -> Callable:
    """The custom op while torch.compile traces, else its implementation called directly: the
    dispatcher's round trip costs more than a small layer's product, and eager needs none of it.
    """

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else impl(*args)

    return call


def _score_accumulate_impl(
    a: Tensor, g: Tensor, alpha: float, out: Tensor, valid: Tensor | None, backend: str
) -> None:
    by_name(backend).score_accumulate(a, g, alpha, out, valid)


_score_accumulate_op = torch.library.custom_op(
    "canfast::score_accumulate", _score_accumulate_impl, mutates_args=("out",)
)
_score_accumulate = _eager(_score_accumulate_op, _score_accumulate_impl)


@_score_accumulate_op.register_fake
def _(a: Tensor, g: Tensor, alpha: float, out: Tensor, valid: Tensor | None, backend: str) -> None:
    return None


def score_accumulate(
    a: Tensor,
    g: Tensor,
    alpha: float,
    out: Tensor,
    valid: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Add per-sample, per-channel sums of ``|g|**alpha * |a|``, ``|a|`` and ``|g|`` to ``out``.

    ``a``, ``g``: ``[B, T, C]`` of one dtype (any strides); ``valid``: bool ``[B, T]`` or None
    (every row); ``out``: float32 ``[B, 3, C]``, added to and returned. ``|g|**0`` is 1, also for
    ``g = 0``, as in ``torch.pow``.
    """
    _check_tensors("score_accumulate", a=a, g=g, out=out, valid=valid)
    if a.dim() != 3:
        raise ValueError(f"a must be [B, T, C], got shape {tuple(a.shape)}")
    if g.shape != a.shape:
        raise ValueError(f"g {tuple(g.shape)} must have the shape of a {tuple(a.shape)}")
    if g.dtype != a.dtype:
        raise ValueError(f"a and g must share a dtype, got {a.dtype} and {g.dtype}")
    batch, steps, channels = a.shape
    if out.dtype != torch.float32 or out.shape != (batch, 3, channels):
        raise ValueError(
            f"out must be float32 [{batch}, 3, {channels}], got {out.dtype} {tuple(out.shape)}"
        )
    alpha = check_alpha(alpha)
    valid = _check_valid(valid, batch, steps)
    chosen = kernels_for(backend, "score_accumulate", a)
    if a.numel():
        _score_accumulate(a, g, alpha, out, valid, chosen.name)
    return out


# ----------------------------------------------------------------------------------------------
# masked_linear


@dataclass
class ScoreSink:
    """Where the backward of :func:`masked_linear` adds a CAN score.

    ``out`` is float32 ``[B, 3, C]`` (the three sums of :func:`score_accumulate`, added to);
    the layer's rows, flattened, split into ``B`` samples of equal length ``T``, of which
    ``valid`` (bool ``[B, T]`` or None) keeps the real ones. Unit ``out`` scores the output
    (``C = N``: ``y`` and ``dL/dy``); unit ``mid`` the input (``C = K``: ``x`` and ``dL/dx``).

    ``pending`` is set by an eager call (not under ``torch.compile``) to the activation its
    backward will score (``[..., C]``: ``[R, C]``, or the layer's own shape where the call ran
    as torch's), and cleared when the backward has added the score: a sink still pending once
    the backward pass is over belongs to a call whose output the loss never used (or whose
    product got no gradient). Each call feeds its sink in one backward pass; a
    second one through a graph kept with ``retain_graph`` raises.
    """

    alpha: float
    out: Tensor
    valid: Tensor | None = None
    unit: str = "out"
    pending: Tensor | None = None


def _canonical_mask(
    mask: Tensor | None, name: str, dtype: torch.dtype, channels: int
) -> Tensor | None:
    """``mask`` ([C] or [M, C]) as [M, C] in ``dtype`` (x's); x's rows are checked per call."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"masked_linear: {name} must be a tensor, got {type(mask).__name__}")
    if mask.dim() not in (1, 2) or mask.shape[-1] != channels:
        raise ValueError(f"{name} must be [{channels}] or [M, {channels}], got {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"{name} must be real, got {mask.dtype}")
    # The reference multiplies by mask.to(x.dtype): every backend sees those values.
    return mask.to(dtype).reshape(-1, channels)


def _check_sink(sink: ScoreSink, rows: int, n_out: int, n_in: int) -> tuple[Tensor | None, float]:
    if sink.unit not in UNITS:
        raise ValueError(f"sink.unit must be 'out' or 'mid', got {sink.unit!r}")
    channels = n_out if sink.unit == "out" else n_in
    out = sink.out
    if not isinstance(out, Tensor) or out.dim() != 3 or out.shape[1:] != (3, channels):
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"sink.out must be [B, 3, {channels}], got {shape}")
    if out.dtype != torch.float32:
        raise ValueError(f"sink.out must be float32, got {out.dtype}")
    samples = out.shape[0]
    if samples == 0 or rows % samples:
        raise ValueError(f"{rows} rows do not split into {samples} samples")
    valid = _check_valid(sink.valid, samples, rows // samples, "sink.valid")
    return valid, check_alpha(sink.alpha)


def _masked_linear_impl(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_mask: Tensor | None,
    in_mask: Tensor | None,
    sink_out: Tensor | None,
    sink_valid: Tensor | None,
    alpha: float,
    sink_unit: str,
    dx_wanted: bool,
    backend: str,
) -> Tensor:
    # The sink arguments are for the backward (see _setup_context); the forward ignores them.
    return by_name(backend).masked_linear(x, weight, bias, out_mask, in_mask)


_masked_linear_op = torch.library.custom_op(
    "canfast::masked_linear", _masked_linear_impl, mutates_args=()
)


@_masked_linear_op.register_fake
def _(x: Tensor, weight: Tensor, *args) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _masked_linear_backward_impl(
    grad_y: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    in_mask: Tensor | None,
    scored: Tensor | None,
    sink_out: Tensor | None,
    sink_valid: Tensor | None,
    alpha: float,
    sink_unit: str,
    dx_wanted: bool,
    backend: str,
) -> Tensor:
    kernels = by_name(backend)
    feed = None
    if sink_out is not None:
        samples = sink_out.shape[0]
        steps = grad_y.shape[0] // samples
        if sink_unit == "out":
            # Unit out needs no product: the score of (y, dL/dy) is one pass before it. Both are
            # in y's dtype, which autocast may have made lower than the weight's.
            g = grad_y.to(scored.dtype).reshape(samples, steps, grad_y.shape[-1])
            kernels.score_accumulate(scored.reshape(g.shape), g, alpha, sink_out, sink_valid)
        else:
            a = scored.reshape(samples, steps, scored.shape[-1])
            feed = ScoreFeed(a, alpha, sink_out, sink_valid)
    if grad_y.dtype != weight.dtype:
        grad_y = grad_y.to(weight.dtype)
    if _dx_shape(grad_y, weight, sink_out, sink_unit, dx_wanted) == (0,):
        return grad_y.new_empty(0)
    return kernels.masked_linear_backward(grad_y, weight, out_mask, in_mask, feed)


def _dx_shape(
    grad_y: Tensor, weight: Tensor, sink_out: Tensor | None, sink_unit: str, dx_wanted: bool
) -> tuple[int, ...]:
    """What the backward op returns: dL/dx, or an empty stand-in when nothing needs it (not the
    caller, nor a unit-mid score)."""
    if dx_wanted or (sink_out is not None and sink_unit == "mid"):
        return (grad_y.shape[0], weight.shape[1])
    return (0,)


_masked_linear_backward_op = torch.library.custom_op(
    "canfast::masked_linear_backward", _masked_linear_backward_impl, mutates_args=("sink_out",)
)
_masked_linear_backward = _eager(_masked_linear_backward_op, _masked_linear_backward_impl)


@_masked_linear_backward_op.register_fake
def _(grad_y: Tensor, weight: Tensor, *args) -> Tensor:
    sink_out, sink_unit, dx_wanted = args[3], args[6], args[7]  # the impl's argument order
    return grad_y.new_empty(_dx_shape(grad_y, weight, sink_out, sink_unit, dx_wanted))


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    x, weight, _, out_mask, in_mask, sink_out, sink_valid, alpha, unit, dx_wanted, backend = inputs
    scored = None
    if sink_out is not None:
        # The score needs the activation back: y for unit out, x for unit mid.
        scored = output if unit == "out" else x
    ctx.save_for_backward(weight, out_mask, in_mask, scored, sink_valid)
    # Added to, not read: saved as a tensor, a second call into the same sums (one sink fed by
    # two calls of a graph) would fail autograd's check that saved tensors stay unchanged.
    ctx.sink_out = sink_out
    ctx.options = (alpha, unit, dx_wanted, backend)


def _backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
    weight, out_mask, in_mask, scored, sink_valid = ctx.saved_tensors
    sink_out = ctx.sink_out
    alpha, unit, dx_wanted, backend = ctx.options
    dx_wanted = dx_wanted and ctx.needs_input_grad[0]
    dx = _masked_linear_backward(
        grad_y,
        weight,
        out_mask,
        in_mask,
        scored,
        sink_out,
        sink_valid,
        alpha,
        unit,
        dx_wanted,
        backend,
    )
    return (dx if dx_wanted else None,) + (None,) * 10


_masked_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _MaskedLinearFunction(torch.autograd.Function):
    """The eager face of the same op: the formula above, without the dispatcher's round trip.
    Only x is differentiable, so everything else travels as one tuple: autograd walks every
    argument of a Function on each call and wants an answer per argument back. ``sink`` is the
    :class:`ScoreSink` whose ``pending`` the backward clears."""

    @staticmethod
    def forward(ctx, x: Tensor, rest: tuple, sink: ScoreSink | None) -> Tensor:
        inputs = (x, *rest)
        output = _masked_linear_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.sink = sink
        if sink is not None:
            ctx.pending = sink.pending = (output if sink.unit == "out" else x).detach()
        return output

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            # backward(create_graph=True): the kernels are not differentiable, so any use of a
            # second derivative must raise. once_differentiable does that, and costs a fifth
            # of a small layer's backward, so it runs only here.
            return _backward_once(ctx, grad_y)
        return _eager_backward(ctx, grad_y)


def _eager_backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
    sink = ctx.sink
    if sink is not None:
        if ctx.pending is None:
            raise RuntimeError(_FED_TWICE)  # as the torch-product path (see _NodeFeed)
        if sink.pending is ctx.pending:
            sink.pending = None
        ctx.pending = None
    return (*_backward(ctx, grad_y)[:2], None)


@once_differentiable
def _backward_once(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
    return _eager_backward(ctx, grad_y)


def _masked_linear(inputs: tuple, sink: ScoreSink | None = None) -> Tensor:
    if torch.compiler.is_compiling():
        return _masked_linear_op(*inputs)
    if torch.is_grad_enabled() and inputs[0].requires_grad:
        return _MaskedLinearFunction.apply(inputs[0], inputs[1:], sink)
    return _masked_linear_impl(*inputs)


def _torch_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` as the aten op it is: ``mm`` (``dL/dx`` is its input 0) or
    ``addmm`` (input 1)."""
    if bias is None:
        return torch.mm(x, weight.t())
    return torch.addmm(bias, x, weight.t())


def _torch_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``_torch_product`` of x's rows, in x's shape.

    Where torch's ``linear`` is itself that ``mm`` / ``addmm`` of the flattened rows (2-D x, or
    contiguous 3-D x, the shape of every transformer's hidden states), it is called on x as it
    is: reshaping to rows and back from Python costs about 80 us per call inside a model's pass
    (the host is cold after each product), as much as everything else a scored call adds.
    """
    if x.dim() == 2 or (x.dim() == 3 and x.is_contiguous()):
        return torch.nn.functional.linear(x, weight, bias)
    return _torch_product(x.reshape(-1, x.shape[-1]), weight, bias).reshape(
        *x.shape[:-1], weight.shape[0]
    )


class _NodeFeed:
    """Adds a sink's score from a hook on the backward node of a torch product (see
    :class:`LinearPlan`): a pre-hook gets ``(dL/dy,)`` (unit out), a post-hook ``dL/dx`` among the
    product's input gradients (unit mid, at ``index``). It holds its call's activation ``a``
    until then, and releases it (and the sink's ``pending``, when it is the same) once fed."""

    __slots__ = ("sink", "a", "score", "alpha", "valid", "shape", "index")

    def __init__(self, sink: ScoreSink, a: Tensor, score: Callable, alpha: float, valid, index):
        self.sink, self.a, self.score, self.alpha, self.valid = sink, a, score, alpha, valid
        samples, channels = sink.out.shape[0], a.shape[-1]
        self.shape = (samples, a.numel() // (samples * channels), channels)
        self.index = index

    def __call__(self, grads: tuple[Tensor | None, ...], *_) -> None:
        a, sink = self.a, self.sink
        if a is None:
            # Held until the node runs, not for the graph's life (every site's activation at
            # once), so a graph kept with retain_graph cannot feed the sink again.
            raise RuntimeError(_FED_TWICE)
        self.a = None
        g = grads[self.index]
        if g is None:  # no gradient reached the product: the call stays pending, g = 0
            return
        if sink.pending is a:
            sink.pending = None
        # Under backward(create_graph=True) g is part of a graph, which the sums must not join;
        # under autocast the product ran in a lower precision than the activation kept.
        if g.requires_grad:
            g = g.detach()
        if g.dtype != a.dtype:
            g = g.to(a.dtype)
        shape = self.shape
        # Hidden states come as [B, T, C] already: a view made from Python costs microseconds
        # in a backward pass, where a shape compared does not.
        if a.shape != shape:
            a = a.reshape(shape)
        if g.shape != shape:
            g = g.reshape(shape)
        self.score(a, g, self.alpha, sink.out, self.valid)


def _check_x(x: Tensor, weight: Tensor) -> None:
    if x.dim() == 0 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"x [..., K] and weight [N, K] do not match: {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype:
        raise ValueError(f"weight ({weight.dtype}) must have x's dtype ({x.dtype})")


@dataclass(frozen=True, eq=False)
class LinearPlan:
    """The arguments of :func:`masked_linear` other than ``x`` and the sink, checked and brought
    into canonical form once; calling the plan checks only ``x`` and the sink.

    A layer that canfast routes (:class:`canfast.mask.Route`) runs with the same weight and masks
    batch after batch. Inside a model's pass the host is cold (the products before it have swept
    its caches), and there the checks of every argument cost more per call than a small layer's
    product: measured at a few hundred microseconds per Linear on a 50M-parameter model.

    For the same reason a call without masks that autograd tracks or that feeds a sink, on a
    backend whose products are torch's (``Backend.torch_products``: cpp, torch), runs as torch's
    own ``mm`` / ``addmm`` rather than through a Python autograd Function: the numbers are the
    same, and on the CPU a Function's forward and backward cost about what a small layer's score
    pass does. A sink is then fed by a hook on a backward node, which runs as the node does.
    """

    weight: Tensor  # detached: weights never receive gradients
    bias: Tensor | None
    out_mask: Tensor | None  # [M, N] in the weight's dtype
    in_mask: Tensor | None  # [M, K]
    backend: str  # the backend that runs it
    batches: tuple[tuple[str, tuple[int, ...]], ...]  # (name, shape) of each [M, C] mask
    by_torch: bool  # no masks, and the backend's products are torch's

    @classmethod
    def of(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        out_mask: Tensor | None = None,
        in_mask: Tensor | None = None,
        *,
        backend: str = "auto",
    ) -> LinearPlan:
        """A plan for ``weight`` ``[N, K]`` (any strides), ``bias`` and the masks, as
        :func:`masked_linear` takes them."""
        _check_tensors(
            "masked_linear", weight=weight, bias=bias, out_mask=out_mask, in_mask=in_mask
        )
        if weight.dim() != 2:
            raise ValueError(f"weight must be [N, K], got {tuple(weight.shape)}")
        n_out, n_in = weight.shape
        if bias is not None and (bias.shape != (n_out,) or not bias.dtype.is_floating_point):
            shape = tuple(bias.shape)
            raise ValueError(f"bias must be a float [{n_out}], got {bias.dtype} {shape}")
        chosen = kernels_for(backend, "masked_linear", weight)
        om = _canonical_mask(out_mask, "out_mask", weight.dtype, n_out)
        im = _canonical_mask(in_mask, "in_mask", weight.dtype, n_in)
        if bias is not None:
            bias = bias.detach().to(weight.dtype)
        batches = tuple(
            (name, tuple(mask.shape))
            for name, mask in (("out_mask", out_mask), ("in_mask", in_mask))
            if mask is not None and mask.dim() == 2
        )
        by_torch = chosen.torch_products and om is None and im is None
        return cls(weight.detach(), bias, om, im, chosen.name, batches, by_torch)

    def __call__(self, x: Tensor, sink: ScoreSink | None = None) -> Tensor:
        weight = self.weight
        _check_tensors("masked_linear", x=x, weight=weight)
        _check_x(x, weight)
        n_out, n_in = weight.shape
        for name, shape in self.batches:
            if x.dim() < 2:
                raise ValueError(f"a batch of masks ({name} {shape}) needs x with rows")
            blocks = shape[0]
            if blocks == 0 or x.shape[0] % blocks:
                raise ValueError(f"{x.shape[0]} rows do not split into {blocks} mask blocks")
        # Only x's gradient is ever computed: weights requiring grad do not make a graph.
        tracked = torch.is_grad_enabled() and x.requires_grad
        by_torch = self.by_torch and tracked and not torch.compiler.is_compiling()
        if sink is None and by_torch:
            return _torch_linear(x, weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n_in)
        if sink is None:
            if tracked:
                y = _masked_linear(self._args(x2, None, None, 0.0, "out", True))
            else:
                with torch.no_grad():
                    y = _masked_linear(self._args(x2, None, None, 0.0, "out", False))
            return y.reshape(*lead, n_out)
        if not torch.is_grad_enabled():
            raise ValueError("a score sink is fed by the backward pass, but grad is disabled")
        _check_tensors("masked_linear", x=x, **{"sink.out": sink.out, "sink.valid": sink.valid})
        valid, alpha = _check_sink(sink, x2.shape[0], n_out, n_in)
        if self.by_torch and not torch.compiler.is_compiling():
            return self._scored_by_torch(x, sink, valid, alpha)
        dx_wanted = x.requires_grad
        if not dx_wanted:
            # Nothing upstream needs dL/dx, but the backward must run to feed the sink: a fresh
            # leaf starts the graph here, and its gradient is not computed unless unit mid
            # scores it.
            x2 = x2.detach().requires_grad_()
        y = _masked_linear(self._args(x2, sink.out, valid, alpha, sink.unit, dx_wanted), sink)
        return y.reshape(*lead, n_out)

    def feed(self, x: Tensor, sink: ScoreSink) -> Tensor:
        """The call with a sink that canfast made for ``x`` (a :class:`canfast.mask.Route`'s,
        sized from x's rows, its ``valid`` bool). Where it runs as torch's product, nothing is
        checked again: the product's own errors stand for x's, as in the module's own forward,
        and every check costs a cold host tens of microseconds per call. Any other call is
        checked as :meth:`__call__` checks it."""
        if self.by_torch and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self._scored_by_torch(x, sink, sink.valid, sink.alpha)
        return self(x, sink)

    def _scored_by_torch(
        self, x: Tensor, sink: ScoreSink, valid: Tensor | None, alpha: float
    ) -> Tensor:
        """An unmasked scored call as torch's own product, its sink fed by a hook on a node of
        the graph: the node that makes ``y`` sees ``dL/dy`` (unit out), the product's node
        ``dL/dx`` among its input gradients (unit mid). Where nothing upstream needs ``dL/dx``
        (the first site on the path), a fresh leaf starts the graph: ``y`` for unit out, whose
        view's node sees ``dL/dy`` (no ``dL/dx`` is computed), and ``x`` for unit mid, whose
        score needs ``dL/dx``."""
        score = by_name(self.backend).score_accumulate
        if sink.unit == "mid":
            n_out = self.weight.shape[0]
            x2 = x.reshape(-1, x.shape[-1])
            if not x2.requires_grad:
                x2 = x2.detach().requires_grad_()
            y = _torch_product(x2, self.weight, self.bias)
            pending = x2.detach()
            index = 0 if self.bias is None else 1  # x's place among mm's / addmm's inputs
            y.grad_fn.register_hook(_NodeFeed(sink, pending, score, alpha, valid, index))
            out = y.reshape(*x.shape[:-1], n_out)
        else:
            out = _torch_linear(x, self.weight, self.bias)
            pending = out.detach()
            node = out.grad_fn
            if node is None:
                out.requires_grad_()
                out = out.view_as(out)
                node = out.grad_fn
            node.register_prehook(_NodeFeed(sink, pending, score, alpha, valid, 0))
        sink.pending = pending
        return out

    def _args(self, x2, sink_out, sink_valid, alpha, unit, dx_wanted) -> tuple:
        """The arguments of the ``canfast::masked_linear`` op, in its order."""
        masks = (self.out_mask, self.in_mask)
        return (
            x2,
            self.weight,
            self.bias,
            *masks,
            sink_out,
            sink_valid,
            alpha,
            unit,
            dx_wanted,
            self.backend,
        )


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    out_mask: Tensor | None = None,
    in_mask: Tensor | None = None,
    sink: ScoreSink | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """``y = ((x * in_mask) @ weight.T + bias) * out_mask``, differentiable in ``x`` only.

    ``x``: ``[..., K]``; ``weight``: ``[N, K]`` in x's dtype, any strides (pass a GPT-2
    ``Conv1D`` weight as ``weight.t()``, no copy); ``bias``: ``[N]`` or None; ``out_mask``
    ``[N]`` / ``[M, N]`` and ``in_mask`` ``[K]`` / ``[M, K]``, where a batch of ``M`` masks
    splits the first dimension of ``x`` into ``M`` equal blocks, block ``m`` using mask ``m``.
    ``sink`` (:class:`ScoreSink`) gets the CAN score sums added by the backward pass; a sink
    where no backward will run is an error. Weight and bias never receive gradients. A layer
    called many times with the same weight and masks can check them once: :class:`LinearPlan`.
    """
    _check_tensors(
        "masked_linear", x=x, weight=weight, bias=bias, out_mask=out_mask, in_mask=in_mask
    )
    _check_x(x, weight)  # x's errors first, as they name both shapes
    return LinearPlan.of(weight, bias, out_mask, in_mask, backend=backend)(x, sink)


# ----------------------------------------------------------------------------------------------
# ablate_expand


def _ablate_expand_impl(
    y: Tensor, neurons: Tensor, mid: Tensor | None, weight: Tensor | None, backend: str
) -> Tensor:
    limit = mid.shape[-1] if mid is not None else y.shape[-1]
    if neurons.numel():
        # An index out of range would read or miss memory in a kernel; torch indexing (the
        # reference) raises IndexError, and so does every backend. One small host sync.
        low, high = (int(v) for v in torch.aminmax(neurons))
        if low < -limit or high >= limit:
            raise IndexError(f"neuron index out of range for {limit} channels: [{low}, {high}]")
    index = torch.where(neurons < 0, neurons + limit, neurons).contiguous()
    return by_name(backend).ablate_expand(y, index, mid, weight)


_ablate_expand_op = torch.library.custom_op(
    "canfast::ablate_expand", _ablate_expand_impl, mutates_args=()
)
_ablate_expand = _eager(_ablate_expand_op, _ablate_expand_impl)


@_ablate_expand_op.register_fake
def _(y: Tensor, neurons: Tensor, *args) -> Tensor:
    return y.new_empty(neurons.shape[0], *y.shape)


def ablate_expand(
    y: Tensor,
    neurons: Tensor,
    mid: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Return ``[n, *y.shape]``: copy ``i`` is ``y`` with neuron ``neurons[i]`` removed.

    Unit ``out`` (``mid`` is None): channel ``neurons[i]`` of ``y`` is zeroed (bit-exact copies).
    Unit ``mid``: ``y`` is a down projection's output ``[..., N]``, ``mid`` its input
    ``[..., K]`` and ``weight`` its ``[N, K]`` matrix (any strides); copy ``i`` is
    ``y - mid[..., j] * weight[:, j]`` computed in float32 and rounded once. Negative neurons
    count from the end; out-of-range ones raise IndexError. Not differentiable.
    """
    _check_tensors("ablate_expand", y=y, mid=mid, weight=weight)
    if y.dim() == 0:
        raise ValueError("y must have a channel dimension")
    if (
        not isinstance(neurons, Tensor)
        or neurons.dim() != 1
        or neurons.dtype.is_floating_point
        or neurons.dtype == torch.bool
        or neurons.is_complex()
    ):
        what = f"{neurons.dtype} {tuple(neurons.shape)}" if isinstance(neurons, Tensor) else neurons
        raise ValueError(f"neurons must be 1-D integers, got {what}")
    channels = y.shape[-1]
    if mid is None:
        if weight is not None:
            raise ValueError("weight is only used with mid (unit mid); unit out takes neither")
    else:
        if weight is None or weight.dim() != 2 or mid.dim() != y.dim():
            raise ValueError("unit mid needs mid [..., K] shaped like y and weight [N, K]")
        if mid.shape[:-1] != y.shape[:-1] or weight.shape != (channels, mid.shape[-1]):
            raise ValueError(
                f"y {tuple(y.shape)}, mid {tuple(mid.shape)} and weight {tuple(weight.shape)} "
                "do not match (y [..., N], mid [..., K], weight [N, K])"
            )
        if mid.dtype != y.dtype or weight.dtype != y.dtype:
            raise ValueError(
                f"y, mid and weight must share a dtype: {y.dtype}, {mid.dtype}, {weight.dtype}"
            )
    chosen = kernels_for(backend, "ablate_expand", y).name
    rows = y.shape[:-1].numel()
    neurons = neurons.to(device=y.device, dtype=torch.int64)
    mid2 = mid.reshape(rows, mid.shape[-1]) if mid is not None else None
    out = _ablate_expand(y.reshape(rows, channels), neurons, mid2, weight, chosen)
    return out.reshape(neurons.shape[0], *y.shape)
