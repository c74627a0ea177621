"""The ``cpp`` backend of :mod:`canfast.ops`: CPU tensors, kernels in ``canfast._C``.

``_C`` takes addresses, sizes, element strides and a dtype code, never a tensor, so it builds
without torch and one binary serves every torch version. This module is the boundary: it checks
every tensor (device, dtype, shape, strides), derives the raw arguments from live tensors, and
keeps the tensors alive for the duration of the call. Channel dimensions must have unit stride
for the kernels; anything else is copied to a contiguous tensor first, while strided rows and
samples (slices, expanded gradients) are passed through as strides.

Semantics are exactly those of :mod:`canfast.ops.reference`; every kernel accumulates in float32
for float32, bfloat16 and float16 inputs. ``masked_linear`` leaves the product to torch's BLAS and
fuses everything around it (input mask; output mask and ``sum |y|``) into single passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from canfast.ops.sink import ScoreSink, needs_graph

try:
    from canfast import _C
except ImportError:  # not built: the dispatcher falls back to the torch reference
    _C = None

AVAILABLE = _C is not None

# The codes _C expects for the element type.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# Below this many elements a pass takes microseconds, less than waking a thread team costs, and
# a team waiting on a core that another process holds stalls for a scheduler slice.
_PARALLEL_MIN_ELEMENTS = 1 << 18


def _threads(elements: int) -> int:
    """Threads for a pass over ``elements`` values: torch's setting (so torch.set_num_threads
    governs both halves of masked_linear), or one for a small pass."""
    return 1 if elements < _PARALLEL_MIN_ELEMENTS else torch.get_num_threads()


def _dtype_code(t: Tensor, name: str) -> int:
    code = _DTYPE_CODES.get(t.dtype)
    if code is None:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    return code


def _check_cpu(op: str, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{op}: the cpp backend runs on CPU tensors; {name} is on {t.device}")


def _unit_channels(t: Tensor) -> Tensor:
    """``t`` itself when its last dimension has unit stride (or size 1), else a contiguous copy."""
    if t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``[rows, channels]`` with unit channel stride; a view whenever torch allows one."""
    flat = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return _unit_channels(flat)


def _row_stride(t2: Tensor) -> int:
    # A single row's stride is never followed; report the row length so _C's overlap check holds.
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


# ----------------------------------------------------------------------------------------------
# score_accumulate


def _valid_bytes(valid: Tensor | None, batch: int, steps: int) -> Tensor | None:
    if valid is None:
        return None
    if valid.shape != (batch, steps):
        raise ValueError(f"valid must be [{batch}, {steps}], got {tuple(valid.shape)}")
    if valid.dtype.is_floating_point or valid.is_complex():
        raise ValueError(f"valid must be a bool (or integer 0/1) mask, got {valid.dtype}")
    if valid.dtype != torch.bool:
        valid = valid != 0
    # bool is one byte per element, 0 or 1: the kernel reads it as uint8.
    return valid.view(torch.uint8)


def score_accumulate(
    a: Tensor, g: Tensor, alpha: float, out: Tensor, valid: Tensor | None = None
) -> Tensor:
    """Add per-sample, per-channel sums of ``|g|**alpha * |a|``, ``|a|`` and ``|g|`` to ``out``.

    ``a``, ``g``: ``[B, T, C]``, one dtype among float32 / bfloat16 / float16; ``valid``: bool
    ``[B, T]`` or None (all rows); ``out``: float32 ``[B, 3, C]``, added to. One pass over ``a``
    and ``g``; ``alpha`` in {0, 0.5, 1} takes a cheaper path than the general power.
    """
    _check_cpu("score_accumulate", a=a, g=g, out=out, valid=valid)
    if a.dim() != 3:
        raise ValueError(f"a must be [B, T, C], got shape {tuple(a.shape)}")
    if g.shape != a.shape:
        raise ValueError(f"g {tuple(g.shape)} must have the shape of a {tuple(a.shape)}")
    code = _dtype_code(a, "a")
    if g.dtype != a.dtype:
        raise ValueError(f"a and g must share a dtype, got {a.dtype} and {g.dtype}")
    batch, steps, channels = a.shape
    if out.dtype != torch.float32 or out.shape != (batch, 3, channels):
        raise ValueError(
            f"out must be float32 [{batch}, 3, {channels}], got {out.dtype} {tuple(out.shape)}"
        )
    alpha = float(alpha)
    if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    keep = _valid_bytes(valid, batch, steps)
    if a.numel() == 0:
        return out
    a = _unit_channels(a)
    g = _unit_channels(g)
    # The kernel adds into a [B, 3, C] block with unit channel stride; any other layout of out
    # gets its sums through a scratch buffer.
    sums = out if out.is_contiguous() else torch.zeros(batch, 3, channels)
    _C.score_accumulate(
        a.data_ptr(),
        g.data_ptr(),
        code,
        batch,
        steps,
        channels,
        a.stride(0),
        a.stride(1),
        g.stride(0),
        g.stride(1),
        keep.data_ptr() if keep is not None else 0,
        keep.stride(0) if keep is not None else 0,
        keep.stride(1) if keep is not None else 0,
        sums.data_ptr(),
        sums.stride(0),
        sums.stride(1),
        alpha,
        _threads(a.numel()),
    )
    if sums is not out:
        out += sums
    return out


# ----------------------------------------------------------------------------------------------
# masked_linear


@dataclass
class _Mask:
    """A mask ready for _C: float32 ``[M, C]``, contiguous."""

    table: Tensor
    blocks: int


def _prepare_mask(mask: Tensor | None, name: str, x: Tensor, channels: int) -> _Mask | None:
    if mask is None:
        return None
    if mask.dim() not in (1, 2) or mask.shape[-1] != channels:
        raise ValueError(f"{name} must be [{channels}] or [M, {channels}], got {tuple(mask.shape)}")
    if mask.is_complex():
        raise ValueError(f"{name} must be real, got {mask.dtype}")
    blocks = 1
    if mask.dim() == 2:
        blocks = mask.shape[0]
        if x.dim() < 2:
            raise ValueError(f"a batch of masks ({name} {tuple(mask.shape)}) needs x with rows")
        if blocks == 0 or x.shape[0] % blocks:
            raise ValueError(f"{x.shape[0]} rows do not split into {blocks} mask blocks")
    # Round through x's dtype first: the reference multiplies by mask.to(x.dtype).
    table = mask.to(x.dtype).to(torch.float32).reshape(blocks, channels).contiguous()
    return _Mask(table, blocks)


def _apply_row_mask(src: Tensor, mask: _Mask, dst: Tensor) -> Tensor:
    """``dst = src * mask`` for 2-D ``src`` / ``dst`` with unit channel stride (may alias)."""
    rows, channels = src.shape
    _C.row_mask(
        src.data_ptr(),
        dst.data_ptr(),
        _DTYPE_CODES[src.dtype],
        rows,
        channels,
        _row_stride(src),
        _row_stride(dst),
        mask.table.data_ptr(),
        mask.blocks,
        channels,
        _threads(src.numel()),
    )
    return dst


def _check_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, stats: Tensor | None
) -> tuple[int, int]:
    if x.dim() == 0 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"x [..., K] and weight [N, K] do not match: {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    _dtype_code(x, "x")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight ({weight.dtype}) must have x's dtype ({x.dtype})")
    n_out, n_in = weight.shape
    if bias is not None and (bias.shape != (n_out,) or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a float [{n_out}], got {bias.dtype} {tuple(bias.shape)}")
    if stats is not None and (stats.shape != (n_out,) or stats.dtype != torch.float32):
        raise ValueError(f"stats must be float32 [{n_out}], got {stats.dtype} {tuple(stats.shape)}")
    return n_out, n_in


def _forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_mask: _Mask | None,
    in_mask: _Mask | None,
    stats: Tensor | None,
) -> Tensor:
    n_out, n_in = weight.shape
    rows = x.shape[:-1].numel()
    x2 = x.reshape(rows, n_in)
    if in_mask is not None:
        # The input mask goes on x, in one C++ pass into a scratch copy, not on the weight's
        # columns: a batch of masks cannot be folded into one weight; a masked weight would be
        # an [N, K] copy per call, kept alive until the backward (for every layer at once);
        # and at scoring's row counts (a few thousand tokens) an [R, K] pass costs about what
        # an [N, K] one would: either is 1/N of the matmul's work. Multiplying, rather than
        # subtracting the masked columns' share from an unmasked product, keeps a masked
        # channel exactly out of the sum, even when its activation dwarfs the others.
        x2 = _apply_row_mask(_rows(x2), in_mask, torch.empty(rows, n_in, dtype=x.dtype))
    # The bias goes into the BLAS call (addmm, as nn.functional.linear does): it is added in
    # fp32 before the one rounding to x's dtype, where a separate pass would round twice.
    if bias is None:
        y = torch.matmul(x2, weight.t())
    else:
        y = torch.addmm(bias.to(x.dtype), x2, weight.t())
    y = _unit_channels(y)
    if out_mask is not None or stats is not None:
        # One pass over y: * out_mask and the |y| column sums (fp32), in place.
        sums = stats if stats is None or stats.is_contiguous() else torch.zeros(n_out)
        _C.linear_epilogue(
            y.data_ptr(),
            _DTYPE_CODES[y.dtype],
            rows,
            n_out,
            _row_stride(y),
            out_mask.table.data_ptr() if out_mask is not None else 0,
            out_mask.blocks if out_mask is not None else 1,
            n_out,
            sums.data_ptr() if sums is not None else 0,
            _threads(y.numel()),
        )
        if stats is not None and sums is not stats:
            stats += sums
    return y.reshape(*x.shape[:-1], n_out)


def _backward(
    grad_y: Tensor, weight: Tensor, out_mask: _Mask | None, in_mask: _Mask | None
) -> Tensor:
    """``dL/dx = ((dL/dy * out_mask) @ W) * in_mask``, as ``[rows, K]``."""
    n_out, n_in = weight.shape
    g2 = grad_y.to(weight.dtype).reshape(-1, n_out)
    if out_mask is not None:
        g2 = _rows(g2)
        g2 = _apply_row_mask(g2, out_mask, torch.empty(g2.shape, dtype=g2.dtype))
    dx = _unit_channels(torch.matmul(g2, weight))
    if in_mask is not None:
        _apply_row_mask(dx, in_mask, dx)
    return dx


class MaskedLinearFunction(torch.autograd.Function):
    """Masked linear layer whose backward gives ``dL/dx`` only: the weights are frozen.

    With a score sink, the backward also adds the CAN score of the layer's output (``y`` and
    ``dL/dy``) through the fused score kernel: one extra read of ``y`` and ``dL/dy``, against
    two BLAS products per layer. ``y`` is kept for the backward only when a sink needs it.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        out_mask: _Mask | None,
        in_mask: _Mask | None,
        stats: Tensor | None,
        sink: ScoreSink | None,
    ) -> Tensor:
        y = _forward(x, weight, bias, out_mask, in_mask, stats)
        ctx.masks = (out_mask, in_mask)
        ctx.sink = sink
        ctx.x_shape = x.shape
        ctx.save_for_backward(weight, y if sink is not None else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        weight, y = ctx.saved_tensors
        out_mask, in_mask = ctx.masks
        if ctx.sink is not None:
            ctx.sink.feed(score_accumulate, y, grad_y)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _backward(grad_y, weight, out_mask, in_mask).reshape(ctx.x_shape)
        return grad_x, None, None, None, None, None, None


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    out_mask: Tensor | None = None,
    in_mask: Tensor | None = None,
    stats: Tensor | None = None,
    sink: ScoreSink | None = None,
) -> Tensor:
    """``y = ((x * in_mask) @ weight.T + bias) * out_mask``, differentiable in ``x`` only.

    ``x``: ``[..., K]``; ``weight``: ``[N, K]`` in x's dtype, any strides (pass a GPT-2
    ``Conv1D`` weight as ``weight.t()``; BLAS reads it transposed, no copy); ``bias``: ``[N]``
    or None; ``out_mask`` ``[N]`` / ``[M, N]`` and ``in_mask`` ``[K]`` / ``[M, K]``, where a
    batch of ``M`` masks splits the first dimension of ``x`` into ``M`` equal blocks.
    ``stats`` (float32 ``[N]``) gets the per-channel sum of ``|y|`` added in the forward;
    ``sink`` (:class:`ScoreSink`) gets the CAN score sums of ``y`` and ``dL/dy`` added in the
    backward. Weight and bias never receive gradients, even when they require them.
    """
    _check_cpu(
        "masked_linear",
        x=x,
        weight=weight,
        bias=bias,
        out_mask=out_mask,
        in_mask=in_mask,
        stats=stats,
    )
    n_out, n_in = _check_linear(x, weight, bias, stats)
    om = _prepare_mask(out_mask, "out_mask", x, n_out)
    im = _prepare_mask(in_mask, "in_mask", x, n_in)
    if sink is not None:
        _check_cpu("masked_linear", **{"sink.out": sink.out, "sink.valid": sink.valid})
    tracked = needs_graph(x, weight, bias, sink)
    if not tracked:
        return _forward(x, weight, bias, om, im, stats)
    return MaskedLinearFunction.apply(x, weight, bias, om, im, stats, sink)


def masked_linear_backward(
    grad_y: Tensor,
    weight: Tensor,
    out_mask: Tensor | None = None,
    in_mask: Tensor | None = None,
) -> Tensor:
    """``dL/dx = ((grad_y * out_mask) @ weight) * in_mask`` for ``grad_y`` ``[..., N]``."""
    _check_cpu("masked_linear_backward", grad_y=grad_y, weight=weight)
    if weight.dim() != 2 or grad_y.dim() == 0 or grad_y.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"grad_y [..., N] and weight [N, K] do not match: "
            f"{tuple(grad_y.shape)} and {tuple(weight.shape)}"
        )
    _dtype_code(weight, "weight")
    om = _prepare_mask(out_mask, "out_mask", grad_y, weight.shape[0])
    im = _prepare_mask(in_mask, "in_mask", grad_y, weight.shape[1])
    return _backward(grad_y, weight, om, im).reshape(*grad_y.shape[:-1], weight.shape[1])


# ----------------------------------------------------------------------------------------------
# ablate_expand


def _neuron_index(neurons: Tensor, limit: int) -> Tensor:
    """``neurons`` as contiguous int64 in ``[0, limit)``; negative ones count from the end."""
    if neurons.dim() != 1 or neurons.dtype.is_floating_point or neurons.dtype == torch.bool:
        raise ValueError(
            f"neurons must be 1-D integers, got {neurons.dtype} {tuple(neurons.shape)}"
        )
    if neurons.is_complex():
        raise ValueError(f"neurons must be 1-D integers, got {neurons.dtype}")
    index = neurons.to(torch.int64)
    if index.numel():
        low, high = (int(v) for v in torch.aminmax(index))
        if low < -limit or high >= limit:
            # IndexError, as torch indexing (the reference) raises.
            raise IndexError(f"neuron index out of range for {limit} channels: [{low}, {high}]")
    return torch.where(index < 0, index + limit, index).contiguous()


def ablate_expand(
    y: Tensor, neurons: Tensor, mid: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    """Return ``[n, *y.shape]``: copy ``i`` is ``y`` with neuron ``neurons[i]`` removed.

    Unit ``out`` (``mid`` is None): channel ``neurons[i]`` of ``y`` is zeroed. Unit ``mid``:
    ``y`` is a down projection's output ``[..., N]``, ``mid`` its input ``[..., K]`` and
    ``weight`` its ``[N, K]`` matrix (any strides); copy ``i`` is ``y - mid[..., j] * W[:, j]``
    in float32, rounded once. Every copy is written in one pass; not differentiable.
    """
    _check_cpu("ablate_expand", y=y, neurons=neurons, mid=mid, weight=weight)
    if y.dim() == 0:
        raise ValueError("y must have a channel dimension")
    code = _dtype_code(y, "y")
    channels = y.shape[-1]
    rows = y.shape[:-1].numel()
    if mid is None:
        if weight is not None:
            raise ValueError("weight is only used with mid (unit mid); unit out takes neither")
        index = _neuron_index(neurons, channels)
    else:
        if weight is None or weight.dim() != 2 or mid.dim() != y.dim():
            raise ValueError("unit mid needs mid [..., K] shaped like y and weight [N, K]")
        if mid.shape[:-1] != y.shape[:-1] or weight.shape != (channels, mid.shape[-1]):
            raise ValueError(
                f"y {tuple(y.shape)}, mid {tuple(mid.shape)} and weight {tuple(weight.shape)} "
                "do not match (y [..., N], mid [..., K], weight [N, K])"
            )
        if not (mid.dtype.is_floating_point and weight.dtype.is_floating_point):
            raise ValueError(f"mid and weight must be floating point: {mid.dtype}, {weight.dtype}")
        index = _neuron_index(neurons, mid.shape[-1])
    n = index.shape[0]
    out = torch.empty(n, *y.shape, dtype=y.dtype)
    if out.numel() == 0:
        return out
    y2 = _rows(y)
    common = (y2.data_ptr(), out.data_ptr(), code, rows, channels, _row_stride(y2), n)
    if mid is None:
        _C.ablate_expand(*common, index.data_ptr(), 0, 0, _threads(out.numel()))
        return out
    # The n columns the copies need are gathered once, in fp32 (O((rows + N) * n), small next
    # to the n * rows * N outputs); the kernel then forms every copy row in one fused pass.
    mid_cols = mid.reshape(rows, mid.shape[-1])[:, index].to(torch.float32).contiguous()
    w_rows = weight[:, index].to(torch.float32).t().contiguous()
    _C.ablate_expand(*common, 0, mid_cols.data_ptr(), w_rows.data_ptr(), _threads(out.numel()))
    return out


__all__ = [
    "AVAILABLE",
    "MaskedLinearFunction",
    "ScoreSink",
    "ablate_expand",
    "masked_linear",
    "masked_linear_backward",
    "score_accumulate",
]
