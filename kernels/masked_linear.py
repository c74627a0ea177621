"""Masked linear layer: ``y = ((x * in_mask) @ W.T + b) * out_mask``, and its backward with the
unit-``mid`` CAN score in its epilogue.

One tiled matmul kernel serves both directions. The input mask is applied to each ``x`` tile as
it is loaded, and bias and output mask are fused into the epilogue, so masking costs no extra
pass over memory. The backward is the same kernel: ``dL/dx = ((g * out_mask) @ W) * in_mask`` is
a masked linear layer with the weight transposed (a stride swap, no copy) and the two masks
exchanged. When it scores unit ``mid``, the epilogue, after storing its ``dL/dx`` tile, reads
it back with the matching tile of ``x`` in narrow column strips and adds the per-sample sums of
``|dL/dx|**alpha * |x|``, ``|x|`` and ``|dL/dx|`` to the score with atomic adds (a row tile may
hold the end of one sample and the start of the next), so scoring writes no copy of ``x`` or
``dL/dx``.

Masks are ``[M, C]``: the rows split into ``M`` equal blocks, block ``m`` using mask row ``m``
(``M = 1``: one mask for every row). ``W`` is in ``nn.Linear`` layout ``[N, K]`` with any
strides, so a GPT-2 ``Conv1D`` weight (``[K, N]``) is passed as ``weight.t()`` without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from canfast.ops.registry import ScoreFeed

from ._aot import AotSpec, Variant
from ._common import (
    configs,
    dot_dtype,
    dot_precision,
    dtype_label,
    prune_by_resources,
    size_bucket,
)
from .score_accumulate import alpha_mode, weighted_term


def _configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SCORE_N": 16},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, bk, stages, warps in tiles
    ]


# The autotune candidates on CUDA, one list per kind of dot, compiled ahead of time for sm_80 and
# sm_90 (canfast.kernels.report): in the heavy variants and the CI subset none spills, with or
# without the score epilogue, and all fit the shared memory of both; bench/results/aot_full.md
# has every variant (the float32 lists complete, bf16/fp16 as far as that run got).
# SCORE_N is the width of the score epilogue's column strips: 16 keeps it to a few registers per
# thread (32 left the IEEE float32 128x128 tile 16 bytes of spill on sm_80).
#
# bf16 and fp16 on the tensor cores (mma.sync / wgmma, hence 4 warps at least and 64-row tiles).
# 128x64x32 over 4 warps is left out: ptxas squeezed it into 128 registers with a 16-byte spill
# on sm_80 in the forward with a shared input mask (bench/results/aot_full.md).
TENSOR_CORE_CONFIGS = _configs(
    [
        (128, 128, 64, 4, 8),
        (128, 128, 32, 4, 8),
        (64, 128, 64, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 32, 5, 4),
    ]
)
# float32 with TF32 dots: a stage's tiles take twice the shared memory of bf16 ones. On sm_80,
# 64x64x32 tiles spilled in some score epilogues with 4 warps and with 8 (ptxas gave those 64
# registers), so the small tile is 64x64x16.
TF32_CONFIGS = _configs(
    [
        (128, 128, 32, 4, 8),
        (128, 128, 16, 4, 8),
        (128, 64, 32, 4, 8),
        (64, 128, 32, 4, 8),
        (64, 64, 16, 4, 4),
    ]
)
# IEEE float32: the dot runs as FMAs on the CUDA cores, and each thread holds its slice of both
# operand tiles in registers for the whole of BLOCK_K, so the tiles are shallower than the tensor
# core ones. With BLOCK_K = 32 and 4 warps every tile from 64x64 up spilled on sm_80, and the
# main loop alone reached 255 registers. Of the tiles tried, two compile clean in every variant
# on both archs (bench/results/aot_full.md): tiles whose forward needs a little more than 80 or 128
# registers over 8 warps get squeezed by ptxas into that many (3 or 2 programs per SM) with
# 4-24 bytes of spill (in one case read in SASS: stored before the main loop, loaded after it):
# 128x64x16, 64x128x16, 64x64x32 on sm_80 and 64x128x32 on sm_90, in masked forwards. They are
# left out.
IEEE_CONFIGS = _configs(
    [
        (128, 128, 16, 4, 8),
        (32, 64, 32, 4, 4),
    ]
)

# How a mask is laid out, selected at compile time.
_NO_MASK = 0
_SHARED_MASK = 1  # [C]: the same for every row
_BATCHED_MASK = 2  # [M, C]: one per block of rows


@triton.jit
def _masked_linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    in_mask_ptr,
    out_mask_ptr,
    act_ptr,
    valid_ptr,
    score_ptr,
    y_ptr,
    M,
    N,
    K,
    m_bucket,
    rows_per_in_mask,
    rows_per_out_mask,
    rows_per_sample,
    alpha,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_b,
    stride_im,
    stride_ik,
    stride_om,
    stride_on,
    stride_am,
    stride_an,
    stride_vb,
    stride_vt,
    stride_sb,
    stride_sk,
    stride_sn,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    IN_MASK: tl.constexpr,
    OUT_MASK: tl.constexpr,
    SCORE: tl.constexpr,
    HAS_VALID: tl.constexpr,
    ALPHA_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SCORE_N: tl.constexpr,
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
    y = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)
    if SCORE:
        # The score of (act, y) reads y back as stored (rounded to its dtype, as a separate
        # pass would see it) in column strips of SCORE_N: holding the whole accumulator, the
        # activation tile and the weighted term at once spilled every tensor-core tile, and the
        # strip just written is still in L1/L2. The barrier makes every thread's stores visible
        # to the threads that read them back.
        tl.debug_barrier()
        sample = rows // rows_per_sample
        keep_rows = row_ok
        if HAS_VALID:
            step = rows % rows_per_sample
            v = tl.load(valid_ptr + sample * stride_vb + step * stride_vt, mask=row_ok, other=0)
            keep_rows = keep_rows & (v != 0)
        # A row tile may span several samples: one masked column sum per sample it touches.
        first = (pid_m * BLOCK_M) // rows_per_sample
        last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // rows_per_sample
        act_rows = act_ptr + rows.to(tl.int64)[:, None] * stride_am
        y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_ym
        for c0 in range(0, BLOCK_N, SCORE_N):
            strip = pid_n * BLOCK_N + c0 + tl.arange(0, SCORE_N)
            strip_ok = strip < N
            keep = keep_rows[:, None] & strip_ok[None, :]
            g = tl.load(y_rows + strip[None, :] * stride_yn, mask=keep, other=0.0)
            g = tl.abs(g.to(tl.float32))
            a = tl.load(act_rows + strip[None, :] * stride_an, mask=keep, other=0.0)
            a = tl.abs(a.to(tl.float32))
            weighted = weighted_term(a, g, alpha, ALPHA_MODE)
            for s in range(first, last + 1):
                mine = (sample == s)[:, None]
                dst = score_ptr + s * stride_sb + strip * stride_sn
                w_sum = tl.sum(tl.where(mine, weighted, 0.0), axis=0)
                tl.atomic_add(dst, w_sum, mask=strip_ok)
                a_sum = tl.sum(tl.where(mine, a, 0.0), axis=0)
                tl.atomic_add(dst + stride_sk, a_sum, mask=strip_ok)
                g_sum = tl.sum(tl.where(mine, g, 0.0), axis=0)
                tl.atomic_add(dst + 2 * stride_sk, g_sum, mask=strip_ok)


def _autotuned(cuda: list[triton.Config]):
    """``_masked_linear_kernel`` autotuned over ``cuda`` (one small config in the interpreter)."""
    return triton.autotune(
        configs=configs(
            cuda=cuda,
            # Two score strips per tile, so the interpreter tests run the strip loop.
            interpreter=triton.Config(
                {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "SCORE_N": 16}
            ),
        ),
        key=["N", "K", "m_bucket"],
        prune_configs_by={
            "early_config_prune": prune_by_resources("masked_linear", "x_ptr", "SCORE")
        },
        # Benchmarking runs the kernel several times; each run must start from the caller's sums.
        restore_value=["score_ptr"],
    )(_masked_linear_kernel)


# One autotuner per dtype label (canfast.kernels._common.dtype_label), each with its own cache
# of tuned configs: a float32 call tuned under IEEE dots is not reused after TF32 is allowed.
_tensor_core = _autotuned(TENSOR_CORE_CONFIGS)
_AUTOTUNED = {
    "bf16": _tensor_core,
    "fp16": _tensor_core,
    "fp32-tf32": _autotuned(TF32_CONFIGS),
    "fp32": _autotuned(IEEE_CONFIGS),
}


def _aot_variants() -> list[Variant]:
    """Every constexpr combination the two launchers produce, for canfast.kernels.report."""
    layouts = (_NO_MASK, _SHARED_MASK, _BATCHED_MASK)
    absent = {_NO_MASK: "none"}
    no_score = dict(
        act_ptr="none", valid_ptr="none", stride_am="i32:16", stride_an="i32:16",
        stride_vb="i32:16", stride_vt="i32:16", stride_sb="i32:16", stride_sk="i32:16",
        stride_sn="i32:16",
    )  # fmt: skip
    variants = []
    for bias in (False, True):
        for in_mask in layouts:
            for out_mask in layouts:
                constexprs = dict(
                    HAS_BIAS=bias, IN_MASK=in_mask, OUT_MASK=out_mask, SCORE=False,
                    HAS_VALID=False, ALPHA_MODE=0,
                )  # fmt: skip
                args = {
                    **no_score,
                    "in_mask_ptr": absent.get(in_mask, "*T"),
                    "out_mask_ptr": absent.get(out_mask, "*T"),
                    "bias_ptr": "*T" if bias else "none",
                }
                name = f"fwd{' bias' * bias} in={in_mask} out={out_mask}"
                variants.append(Variant(name, constexprs, args))
    # masked_linear_backward: the weight transposed (its n stride is the unit one), no bias, the
    # masks exchanged, and optionally a unit-mid score fed in the epilogue.
    scores = [(False, False, 0)] + [(True, v, a) for v in (False, True) for a in range(4)]
    for in_mask in layouts:
        for out_mask in layouts:
            for score, valid, alpha in scores:
                constexprs = dict(
                    HAS_BIAS=False, IN_MASK=in_mask, OUT_MASK=out_mask, SCORE=score,
                    HAS_VALID=valid, ALPHA_MODE=alpha,
                )  # fmt: skip
                args = {
                    **({} if score else no_score),
                    "in_mask_ptr": absent.get(in_mask, "*T"),
                    "out_mask_ptr": absent.get(out_mask, "*T"),
                    "bias_ptr": "none",
                    "stride_wn": "1",
                    "stride_wk": "i32:16",
                }
                if score and not valid:
                    args.update(valid_ptr="none", stride_vb="i32:16", stride_vt="i32:16")
                name = f"bwd in={in_mask} out={out_mask}"
                if score:
                    name += f" score{' valid' * valid} alpha={alpha}"
                variants.append(Variant(name, constexprs, args))
    return variants


def _aot_dtype_constexprs(dtype: str) -> list[tuple[str, dict]]:
    if dtype == "fp32":
        # torch.backends.cuda.matmul.allow_tf32 picks between the two (see dot_precision).
        return [
            ("fp32", {"DOT_DTYPE": tl.float32, "DOT_PRECISION": "ieee"}),
            ("fp32-tf32", {"DOT_DTYPE": tl.float32, "DOT_PRECISION": "tf32"}),
        ]
    dot = {"bf16": tl.bfloat16, "fp16": tl.float16}[dtype]
    return [(dtype, {"DOT_DTYPE": dot, "DOT_PRECISION": "tf32"})]


AOT = AotSpec(
    kernel=_tensor_core,
    configs=TENSOR_CORE_CONFIGS,
    dtype_configs={"fp32-tf32": TF32_CONFIGS, "fp32": IEEE_CONFIGS},
    args=dict(
        x_ptr="*T",
        w_ptr="*T",
        bias_ptr="*T",
        in_mask_ptr="*T",
        out_mask_ptr="*T",
        act_ptr="*T",
        valid_ptr="*u8",
        score_ptr="*fp32",
        y_ptr="*T",
        M="i32",
        N="i32:16",
        K="i32:16",
        m_bucket="i32:16",
        rows_per_in_mask="i32",
        rows_per_out_mask="i32",
        rows_per_sample="i32",
        alpha="fp32",
        stride_xm="i32:16",
        stride_xk="1",
        stride_wn="i32:16",
        stride_wk="1",
        stride_b="1",
        stride_im="i32:16",
        stride_ik="1",
        stride_om="i32:16",
        stride_on="1",
        stride_am="i32:16",
        stride_an="1",
        stride_vb="i32",
        stride_vt="1",
        stride_sb="i32:16",
        stride_sk="i32:16",
        stride_sn="1",
        stride_ym="i32:16",
        stride_yn="1",
    ),  # fmt: skip
    variants=_aot_variants(),
    dtype_constexprs=_aot_dtype_constexprs,
    tensor_core=("bf16", "fp16", "fp32-tf32"),
    heavy=(
        "fwd bias in=2 out=2",
        "bwd in=2 out=2 score valid alpha=3",
        "bwd in=2 out=2 score valid alpha=1",
        "bwd in=2 out=2",
        # Lighter epilogues that still spilled where the ones above did not (the CI test
        # compares every variant of its subset with the table).
        "bwd in=1 out=0 score valid alpha=2",
        "bwd in=2 out=0 score valid alpha=3",
        "bwd in=0 out=1 score alpha=3",
        "bwd in=2 out=1 score valid alpha=1",
    ),
    table_split="SCORE",
)


def _mask_layout(mask: Tensor | None, rows: int) -> tuple[Tensor | None, int, int]:
    """A mask [M, C] (or None): its kernel layout and the rows per block."""
    if mask is None:
        return None, _NO_MASK, 1
    if mask.shape[0] == 1:
        return mask[0], _SHARED_MASK, 1
    return mask, _BATCHED_MASK, max(rows // mask.shape[0], 1)


def _mask_strides(mask: Tensor | None, layout: int) -> tuple[int, int]:
    if layout == _BATCHED_MASK:
        return mask.stride()
    return 0, mask.stride(-1) if mask is not None else 0


def _launch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_mask: Tensor | None,
    in_mask: Tensor | None,
    feed: ScoreFeed | None,
) -> Tensor:
    """``((x * in_mask) @ weight.T + bias) * out_mask`` for ``x`` ``[R, K]``; a feed's score of
    ``(feed.a, y)`` is added in the epilogue."""
    rows, n_in = x.shape
    n_out = weight.shape[0]
    in_mask, in_layout, rows_per_in_mask = _mask_layout(in_mask, rows)
    out_mask, out_layout, rows_per_out_mask = _mask_layout(out_mask, rows)
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    if not (rows and n_out):
        return y
    if feed is not None:
        act = feed.a.reshape(rows, n_out)
        valid = feed.valid.view(torch.uint8) if feed.valid is not None else None
        score, samples = feed.out, feed.out.shape[0]
    else:
        act = valid = None
        # Older Triton releases clone every restore_value argument while autotuning, None too.
        score, samples = y.new_empty(0, dtype=torch.float32), 1

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    precision = dot_precision(x.dtype)
    _AUTOTUNED[dtype_label(x.dtype, precision)][grid](
        x,
        weight,
        bias,
        in_mask,
        out_mask,
        act,
        valid,
        score,
        y,
        rows,
        n_out,
        n_in,
        size_bucket(rows),
        rows_per_in_mask,
        rows_per_out_mask,
        rows // samples,
        float(feed.alpha) if feed is not None else 0.0,
        *x.stride(),
        *weight.stride(),
        bias.stride(0) if bias is not None else 0,
        *_mask_strides(in_mask, in_layout),
        *_mask_strides(out_mask, out_layout),
        *(act.stride() if act is not None else (0, 0)),
        *(valid.stride() if valid is not None else (0, 0)),
        *(score.stride() if feed is not None else (0, 0, 0)),
        *y.stride(),
        HAS_BIAS=bias is not None,
        IN_MASK=in_layout,
        OUT_MASK=out_layout,
        SCORE=feed is not None,
        HAS_VALID=valid is not None,
        ALPHA_MODE=alpha_mode(float(feed.alpha)) if feed is not None else 0,
        DOT_DTYPE=dot_dtype(x.dtype),
        DOT_PRECISION=precision,
    )
    return y


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_mask: Tensor | None,
    in_mask: Tensor | None,
) -> Tensor:
    """The forward: ``x`` ``[R, K]``, ``weight`` ``[N, K]`` (any strides); ``y`` ``[R, N]``."""
    return _launch(x, weight, bias, out_mask, in_mask, None)


def masked_linear_backward(
    grad_y: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    in_mask: Tensor | None,
    feed: ScoreFeed | None,
) -> Tensor:
    """``dL/dx = ((grad_y * out_mask) @ weight) * in_mask`` as ``[R, K]``: the forward kernel on
    the transposed weight with the masks exchanged; a unit-mid feed is scored in its epilogue."""
    return _launch(grad_y, weight.t(), None, in_mask, out_mask, feed)
