"""The ``cpp`` backend: CPU kernels in ``canfast._C``, registered with :mod:`canfast.ops`.

``_C`` takes addresses, sizes, element strides and a dtype code, never a tensor, so it builds
without torch and one binary serves every torch version. This module is the boundary: the
contract (:mod:`canfast.ops.contract`) has checked the arguments, and here the raw arguments are
derived from live tensors, which stay alive for the duration of the call. Channel dimensions
must have unit stride for the kernels; anything else is copied to a contiguous tensor first,
while strided rows and samples (slices, expanded gradients) are passed through as strides.

Every kernel accumulates in float32 for float32, bfloat16 and float16 inputs. ``masked_linear``
leaves the products to torch's BLAS and fuses everything around them into single passes: the
input mask before the product, the output mask after it, and in the backward one pass over
``dL/dx`` that applies the input mask and adds the unit-``mid`` score of ``(x, dL/dx)``.
Without masks those kernels would add nothing to torch's products, so the contract runs such
calls as torch's own (``torch_products=True``) and only the score passes are this module's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from canfast.ops.registry import Backend, ScoreFeed, register

try:
    from canfast import _C
except ImportError:  # not built: the dispatcher falls back to the torch reference
    _C = None

# The codes _C expects for the element type.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# Elements per thread of a pass. Every pass here streams memory once, and inside a backward pass
# its input is mostly cold: the activation a score reads was written by the forward pass. From
# memory a second thread pays well below the size where it would from cache: on this project's
# 2-core CPU, scoring a [516, 640] float32 site (330k elements) inside the backward of
# bench/score_end_to_end.py's model took 185 us on one thread and 135 us on two, and a
# [516, 1728] site 200 us on two. Passes under this size run on one thread, where starting a team
# costs about what it saves.
_ELEMENTS_PER_THREAD = 1 << 16


def _threads(elements: int) -> int:
    """Threads for a pass over ``elements`` values: one per ``_ELEMENTS_PER_THREAD``, at most
    torch's setting (so torch.set_num_threads governs both halves of masked_linear)."""
    return max(1, min(torch.get_num_threads(), elements // _ELEMENTS_PER_THREAD))


def _unit_channels(t: Tensor) -> Tensor:
    """``t`` itself when its last dimension has unit stride (or size 1), else a contiguous copy."""
    if t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _row_stride(t2: Tensor) -> int:
    # A single row's stride is never followed; report the row length so _C's overlap check holds.
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


# ----------------------------------------------------------------------------------------------
# score_accumulate


def _score_into(
    a: Tensor,
    g: Tensor,
    alpha: float,
    out: Tensor,
    valid: Tensor | None,
    g_mask: Tensor | None = None,
) -> None:
    """The score pass of ``_C``; with ``g_mask`` (float32 ``[M, C]``, contiguous) it first
    multiplies ``g`` by it in place, row block ``m`` of the flattened rows using row ``m``, and
    scores the masked values."""
    batch, steps, channels = a.shape
    a = _unit_channels(a)
    g = _unit_channels(g)
    # Called from the backward pass of every scored Linear, where each tensor attribute read
    # costs microseconds (the host is cold after a product): strides are read once, as tuples.
    a_strides, g_strides = a.stride(), g.stride()
    # bool is one byte per element, 0 or 1: the kernel reads it as uint8.
    keep, keep_strides = 0, (0, 0)
    if valid is not None:
        keep, keep_strides = valid.data_ptr(), valid.stride()
    # The kernel adds into a [B, 3, C] block with unit channel stride; any other layout of out
    # gets its sums through a scratch buffer.
    sums = out if out.is_contiguous() else torch.zeros(batch, 3, channels)
    _C.score_accumulate(
        a.data_ptr(),
        g.data_ptr(),
        _DTYPE_CODES[a.dtype],
        batch,
        steps,
        channels,
        a_strides[0],
        a_strides[1],
        g_strides[0],
        g_strides[1],
        keep,
        *keep_strides,
        sums.data_ptr(),
        3 * channels,
        channels,
        alpha,
        _threads(batch * steps * channels),
        g_mask.data_ptr() if g_mask is not None else 0,
        g_mask.shape[0] if g_mask is not None else 1,
    )
    if sums is not out:
        out += sums


def score_accumulate(
    a: Tensor, g: Tensor, alpha: float, out: Tensor, valid: Tensor | None = None
) -> None:
    """One pass over ``a`` and ``g``; ``alpha`` in {0, 0.5, 1} takes a cheaper path than the
    general power."""
    _score_into(a, g, alpha, out, valid)


# ----------------------------------------------------------------------------------------------
# masked_linear


def _mask_table(mask: Tensor | None) -> Tensor | None:
    """A mask [M, C] as _C reads it: float32, contiguous."""
    return None if mask is None else mask.to(torch.float32).contiguous()


def _apply_row_mask(src: Tensor, mask: Tensor, dst: Tensor) -> Tensor:
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
        mask.data_ptr(),
        mask.shape[0],
        channels,
        _threads(src.numel()),
    )
    return dst


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_mask: Tensor | None,
    in_mask: Tensor | None,
) -> Tensor:
    """``x`` ``[R, K]``; the weight in any strides (a Conv1D's ``weight.t()``: BLAS reads it
    transposed, no copy)."""
    rows, n_in = x.shape
    if in_mask is not None:
        # The input mask goes on x, in one C++ pass into a scratch copy, not on the weight's
        # columns: a batch of masks cannot be folded into one weight; a masked weight would be
        # an [N, K] copy per call, kept alive until the backward (for every layer at once);
        # and at scoring's row counts (a few thousand tokens) an [R, K] pass costs about what
        # an [N, K] one would: either is 1/N of the matmul's work. Multiplying, rather than
        # subtracting the masked columns' share from an unmasked product, keeps a masked
        # channel exactly out of the sum, even when its activation dwarfs the others.
        x = _apply_row_mask(
            _unit_channels(x), _mask_table(in_mask), torch.empty(rows, n_in, dtype=x.dtype)
        )
    # The bias goes into the BLAS call (addmm, as nn.functional.linear does): it is added in
    # fp32 before the one rounding to x's dtype, where a separate pass would round twice.
    if bias is None:
        y = torch.matmul(x, weight.t())
    else:
        y = torch.addmm(bias, x, weight.t())
    if out_mask is not None:
        y = _unit_channels(y)
        _apply_row_mask(y, _mask_table(out_mask), y)
    return y


def masked_linear_backward(
    grad_y: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    in_mask: Tensor | None,
    feed: ScoreFeed | None,
) -> Tensor:
    """``dL/dx = ((dL/dy * out_mask) @ W) * in_mask``; with a unit-mid feed, the in-mask and the
    score of ``(x, dL/dx)`` are one pass over ``dL/dx`` right after the product."""
    if out_mask is not None:
        g2 = _unit_channels(grad_y)
        grad_y = _apply_row_mask(g2, _mask_table(out_mask), torch.empty(g2.shape, dtype=g2.dtype))
    dx = _unit_channels(torch.matmul(grad_y, weight))
    if feed is not None:
        g3 = dx.view(feed.a.shape)
        _score_into(feed.a, g3, feed.alpha, feed.out, feed.valid, _mask_table(in_mask))
    elif in_mask is not None:
        _apply_row_mask(dx, _mask_table(in_mask), dx)
    return dx


# ----------------------------------------------------------------------------------------------
# ablate_expand


def ablate_expand(
    y: Tensor, neurons: Tensor, mid: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    """Every copy is written in one pass; unit mid in float32, rounded once."""
    rows, channels = y.shape
    n = neurons.shape[0]
    out = torch.empty(n, rows, channels, dtype=y.dtype)
    if out.numel() == 0:
        return out
    y2 = _unit_channels(y)
    common = (y2.data_ptr(), out.data_ptr(), _DTYPE_CODES[y.dtype], rows, channels)
    common += (_row_stride(y2), n)
    if mid is None:
        _C.ablate_expand(*common, neurons.data_ptr(), 0, 0, _threads(out.numel()))
        return out
    # The n columns the copies need are gathered once, in fp32 (O((rows + N) * n), small next
    # to the n * rows * N outputs); the kernel then forms every copy row in one fused pass.
    mid_cols = mid[:, neurons].to(torch.float32).contiguous()
    w_rows = weight[:, neurons].to(torch.float32).t().contiguous()
    _C.ablate_expand(*common, 0, mid_cols.data_ptr(), w_rows.data_ptr(), _threads(out.numel()))
    return out


if _C is not None:
    register(
        Backend(
            name="cpp",
            devices=frozenset({"cpu"}),
            auto_for=frozenset({"cpu"}),
            dtypes=tuple(_DTYPE_CODES),
            score_accumulate=score_accumulate,
            masked_linear=masked_linear,
            masked_linear_backward=masked_linear_backward,
            ablate_expand=ablate_expand,
            torch_products=True,
        )
    )
