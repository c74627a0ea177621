"""Masked linear layer: ``y = ((x * in_mask) @ W.T + b) * out_mask``, with ``sum |y|`` on the side.

One tiled matmul kernel serves both directions. The input mask is applied to each ``x`` tile as
it is loaded, and bias, output mask and the per-channel ``sum |y|`` (atomic adds) are fused into
the epilogue, so masking costs no extra pass over memory. The backward is the same kernel:
``dL/dx = ((g * out_mask) @ W) * in_mask`` is a masked linear layer with the weight transposed (a
stride swap, no copy) and the two masks exchanged.

Masks are ``[C]`` (one for every row) or ``[M, C]``: a batch of masks, the rows of ``x`` (its
first dimension) split into ``M`` equal blocks. Because the blocks are contiguous along the first
dimension, they stay contiguous once the leading dimensions are flattened, so the kernel only
needs the number of flattened rows per block.

``W`` is in ``nn.Linear`` layout ``[N, K]`` with any strides, so a GPT-2 ``Conv1D`` weight
(``[K, N]``) is passed as ``weight.t()`` without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from canfast.ops.sink import ScoreSink, needs_graph

from ._aot import AotSpec, Variant
from ._common import (
    check_dtypes,
    check_tensors,
    configs,
    dot_dtype,
    dot_precision,
    prune_by_resources,
    size_bucket,
)
from .score_accumulate import score_accumulate

# The autotune candidates on CUDA. Each is compiled ahead of time for sm_80 and sm_90 in every
# dtype and launcher variant (canfast.kernels.report): none spills in bf16, fp16 or TF32, and each
# bf16/fp16 dot runs on mma.sync / wgmma (hence 4 warps at least and 64-row tiles). In IEEE
# float32 (a dot on the CUDA cores) some spill or overflow shared memory; the autotuner drops
# those per call from the compiled-resource table in _resources.py.
CUDA_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        num_stages=stages,
        num_warps=warps,
    )
    for bm, bn, bk, stages, warps in [
        (128, 128, 64, 4, 8),
        (128, 128, 32, 4, 8),
        (64, 128, 64, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 5, 4),
    ]
]

# How a mask is laid out, selected at compile time.
_NO_MASK = 0
_SHARED_MASK = 1  # [C]: the same for every row
_BATCHED_MASK = 2  # [M, C]: one per block of rows


@triton.autotune(
    configs=configs(
        cuda=CUDA_CONFIGS,
        interpreter=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}),
    ),
    key=["N", "K", "m_bucket"],
    prune_configs_by={"early_config_prune": prune_by_resources("masked_linear", "x_ptr")},
    # Benchmarking runs the kernel several times; each run must start from the caller's sums.
    restore_value=["stats_ptr"],
)
@triton.jit
def _masked_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    in_mask_ptr,
    out_mask_ptr,
    stats_ptr,
    y_ptr,
    M,
    N,
    K,
    m_bucket,
    rows_per_in_mask,
    rows_per_out_mask,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_b,
    stride_im,
    stride_ik,
    stride_om,
    stride_on,
    stride_s,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    IN_MASK: tl.constexpr,
    OUT_MASK: tl.constexpr,
    HAS_STATS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles sweep the column tiles together, so the weight tiles
    # they share are still in L2 when the next row tile needs them.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    # 64-bit offsets: rows * stride passes 2**31 for long flattened batches.
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    if IN_MASK == 2:
        in_mask_rows = in_mask_ptr + (rows // rows_per_in_mask)[:, None] * stride_im

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x_ok = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_rows + ks[None, :] * stride_xk, mask=x_ok, other=0.0)
        if IN_MASK == 1:
            m = tl.load(in_mask_ptr + ks * stride_ik, mask=k_ok, other=0.0)[None, :]
            x = x.to(tl.float32) * m.to(tl.float32)
        elif IN_MASK == 2:
            # A row tile may straddle two mask blocks, so the mask is gathered per row; the
            # [M, K] mask table is small and stays in cache.
            m = tl.load(in_mask_rows + ks[None, :] * stride_ik, mask=x_ok, other=0.0)
            x = x.to(tl.float32) * m.to(tl.float32)
        w_ok = k_ok[:, None] & col_ok[None, :]
        w = tl.load(w_cols + ks[:, None] * stride_wk, mask=w_ok, other=0.0)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols * stride_b, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if OUT_MASK == 1:
        out_mask = tl.load(out_mask_ptr + cols * stride_on, mask=col_ok, other=0.0)
        acc *= out_mask.to(tl.float32)[None, :]
    elif OUT_MASK == 2:
        out_mask = out_mask_ptr + (rows // rows_per_out_mask)[:, None] * stride_om
        acc *= tl.load(out_mask + cols[None, :] * stride_on, mask=ok, other=0.0).to(tl.float32)
    if HAS_STATS:
        # Rows past M hold the bias, not data: leave them out of the sums.
        col_sums = tl.sum(tl.where(ok, tl.abs(acc), 0.0), axis=0)
        tl.atomic_add(stats_ptr + cols * stride_s, col_sums, mask=col_ok)
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _aot_variants() -> list[Variant]:
    """Every constexpr combination the two launchers produce, for canfast.kernels.report."""
    variants = []
    absent = {_NO_MASK: "none"}
    for bias in (False, True):
        for in_mask in (_NO_MASK, _SHARED_MASK, _BATCHED_MASK):
            for out_mask in (_NO_MASK, _SHARED_MASK, _BATCHED_MASK):
                for stats in (False, True):
                    name = f"fwd{' bias' * bias} in={in_mask} out={out_mask}{' stats' * stats}"
                    constexprs = dict(
                        HAS_BIAS=bias, IN_MASK=in_mask, OUT_MASK=out_mask, HAS_STATS=stats
                    )
                    args = {"in_mask_ptr": absent.get(in_mask, "*T")}
                    args["out_mask_ptr"] = absent.get(out_mask, "*T")
                    args["bias_ptr"] = "*T" if bias else "none"
                    variants.append(Variant(name, constexprs, args))
    # masked_linear_backward: the weight transposed (its n stride is the unit one), no bias and
    # no stats, the masks exchanged.
    for in_mask in (_NO_MASK, _SHARED_MASK, _BATCHED_MASK):
        for out_mask in (_NO_MASK, _SHARED_MASK, _BATCHED_MASK):
            constexprs = dict(HAS_BIAS=False, IN_MASK=in_mask, OUT_MASK=out_mask, HAS_STATS=False)
            args = {
                "in_mask_ptr": absent.get(in_mask, "*T"),
                "out_mask_ptr": absent.get(out_mask, "*T"),
                "bias_ptr": "none",
                "stride_wn": "1",
                "stride_wk": "i32:16",
            }
            variants.append(Variant(f"bwd in={in_mask} out={out_mask}", constexprs, args))
    return variants


def _aot_dtype_constexprs(dtype: str) -> list[tuple[str, dict]]:
    if dtype == "fp32":
        # torch.backends.cuda.matmul.allow_tf32 picks between the two (see dot_precision).
        return [
            ("fp32", {"DOT_DTYPE": tl.float32, "DOT_PRECISION": "ieee"}),
            ("fp32-tf32", {"DOT_DTYPE": tl.float32, "DOT_PRECISION": "tf32"}),
        ]
    return [
        (
            dtype,
            {
                "DOT_DTYPE": getattr(tl, {"bf16": "bfloat16", "fp16": "float16"}[dtype]),
                "DOT_PRECISION": "tf32",
            },
        )
    ]


AOT = AotSpec(
    kernel=_masked_linear_kernel,
    configs=CUDA_CONFIGS,
    args=dict(
        x_ptr="*T",
        w_ptr="*T",
        bias_ptr="*T",
        in_mask_ptr="*T",
        out_mask_ptr="*T",
        stats_ptr="*fp32",
        y_ptr="*T",
        M="i32",
        N="i32:16",
        K="i32:16",
        m_bucket="i32:16",
        rows_per_in_mask="i32",
        rows_per_out_mask="i32",
        stride_xm="i32:16",
        stride_xk="1",
        stride_wn="i32:16",
        stride_wk="1",
        stride_b="1",
        stride_im="i32:16",
        stride_ik="1",
        stride_om="i32:16",
        stride_on="1",
        stride_s="1",
        stride_ym="i32:16",
        stride_yn="1",
    ),
    variants=_aot_variants(),
    dtype_constexprs=_aot_dtype_constexprs,
    tensor_core=("bf16", "fp16", "fp32-tf32"),
    heavy=("fwd bias in=2 out=2 stats", "bwd in=2 out=2"),
)


def _mask_layout(
    mask: Tensor | None, name: str, x: Tensor, channels: int
) -> tuple[Tensor | None, int, int]:
    """Check ``mask`` against ``x``; return it in ``x``'s dtype, its layout and rows per block."""
    if mask is None:
        return None, _NO_MASK, 1
    if mask.dim() not in (1, 2) or mask.shape[-1] != channels:
        raise ValueError(f"{name} must be [{channels}] or [M, {channels}], got {tuple(mask.shape)}")
    # The reference multiplies by mask.to(x.dtype); converting here gives the same values.
    mask = mask.to(x.dtype)
    if mask.dim() == 1:
        return mask, _SHARED_MASK, 1
    if x.dim() < 2:
        raise ValueError(f"a batch of masks ({name} {tuple(mask.shape)}) needs x with a row dim")
    blocks = mask.shape[0]
    if blocks == 0 or x.shape[0] % blocks:
        raise ValueError(f"{x.shape[0]} rows do not split into {blocks} mask blocks")
    flat_rows = x.shape[:-1].numel()
    return mask, _BATCHED_MASK, max(flat_rows // blocks, 1)


def masked_linear_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    out_mask: Tensor | None = None,
    in_mask: Tensor | None = None,
    stats: Tensor | None = None,
) -> Tensor:
    """``((x * in_mask) @ weight.T + bias) * out_mask``, no autograd; ``stats += sum |y|``.

    ``x``: ``[..., K]``; ``weight``: ``[N, K]`` (any strides); ``bias``: ``[N]``; masks ``[C]``
    or ``[M, C]``; ``stats``: float32 ``[N]``. Returns ``y`` ``[..., N]`` in ``x``'s dtype.
    """
    if x.dim() == 0 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"x [..., K] and weight [N, K] do not match: {x.shape} and {weight.shape}")
    n_out, n_in = weight.shape
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"bias must be [{n_out}], got {tuple(bias.shape)}")
    if stats is not None and (stats.shape != (n_out,) or stats.dtype != torch.float32):
        raise ValueError(f"stats must be float32 [{n_out}], got {stats.dtype} {tuple(stats.shape)}")
    check_tensors("masked_linear", x, weight, bias, out_mask, in_mask, stats)
    check_dtypes("masked_linear", x, weight, bias)
    in_mask, in_layout, rows_per_in_mask = _mask_layout(in_mask, "in_mask", x, n_in)
    out_mask, out_layout, rows_per_out_mask = _mask_layout(out_mask, "out_mask", x, n_out)

    rows = x.shape[:-1].numel()
    x2 = x.reshape(rows, n_in)
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    if rows and n_out:

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

        _masked_linear_kernel[grid](
            x2,
            weight,
            bias,
            in_mask,
            out_mask,
            # Older Triton releases clone every restore_value argument while autotuning, None too.
            stats if stats is not None else y.new_empty(0, dtype=torch.float32),
            y,
            rows,
            n_out,
            n_in,
            size_bucket(rows),
            rows_per_in_mask,
            rows_per_out_mask,
            *x2.stride(),
            *weight.stride(),
            bias.stride(0) if bias is not None else 0,
            *(in_mask.stride() if in_layout == _BATCHED_MASK else (0, _last_stride(in_mask))),
            *(out_mask.stride() if out_layout == _BATCHED_MASK else (0, _last_stride(out_mask))),
            stats.stride(0) if stats is not None else 0,
            *y.stride(),
            HAS_BIAS=bias is not None,
            IN_MASK=in_layout,
            OUT_MASK=out_layout,
            HAS_STATS=stats is not None,
            DOT_DTYPE=dot_dtype(x.dtype),
            DOT_PRECISION=dot_precision(x.dtype),
        )
    return y.reshape(*x.shape[:-1], n_out)


def _last_stride(t: Tensor | None) -> int:
    return t.stride(-1) if t is not None else 0


def masked_linear_backward(
    grad_y: Tensor,
    weight: Tensor,
    out_mask: Tensor | None = None,
    in_mask: Tensor | None = None,
) -> Tensor:
    """``dL/dx = ((grad_y * out_mask) @ weight) * in_mask`` for ``grad_y`` ``[..., N]``.

    The forward kernel run on the transposed weight with the masks exchanged; no weight gradient.
    """
    return masked_linear_forward(grad_y, weight.t(), None, out_mask=in_mask, in_mask=out_mask)


class MaskedLinearFunction(torch.autograd.Function):
    """Masked linear layer whose backward gives ``dL/dx`` only (the weights are frozen).

    The score sink is fed by calling the score kernel on ``(y, dL/dy)`` in the backward rather
    than fusing it into the ``dL/dx`` matmul: that matmul is compute-bound and reads each ``dL/dy``
    tile once per output column tile, so folding a per-sample reduction into it would need a
    segmented reduction across row tiles and would slow the programs that do it, while the
    separate pass is memory-bound and costs about 13% of the matmul at LLaVA shapes
    (see bench/roofline_triton.md).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        out_mask: Tensor | None,
        in_mask: Tensor | None,
        stats: Tensor | None,
        sink: ScoreSink | None,
    ) -> Tensor:
        y = masked_linear_forward(x, weight, bias, out_mask, in_mask, stats)
        ctx.sink = sink
        # y is kept only when the score needs it: it is as large as the layer's output.
        ctx.save_for_backward(weight, out_mask, in_mask, y if sink is not None else None)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        weight, out_mask, in_mask, y = ctx.saved_tensors
        if ctx.sink is not None:
            ctx.sink.feed(score_accumulate, y, grad_y)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = masked_linear_backward(grad_y, weight, out_mask, in_mask)
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

    ``x``: ``[..., K]``; ``weight``: ``[N, K]``, any strides (pass a GPT-2 ``Conv1D`` weight as
    ``weight.t()``); ``bias``: ``[N]`` or None; ``out_mask`` ``[N]`` / ``[M, N]`` and ``in_mask``
    ``[K]`` / ``[M, K]``, a batch of masks splitting the first dimension of ``x`` into ``M``
    blocks. ``stats`` (float32 ``[N]``) gets the per-channel sum of ``|y|`` added in the forward.
    ``sink`` gets the CAN score sums of ``y`` and ``dL/dy`` added in the backward.

    Weight and bias never receive gradients, even when they require them.
    """
    tracked = needs_graph(x, weight, bias, sink)
    if not tracked:
        return masked_linear_forward(x, weight, bias, out_mask, in_mask, stats)
    return MaskedLinearFunction.apply(x, weight, bias, out_mask, in_mask, stats, sink)
