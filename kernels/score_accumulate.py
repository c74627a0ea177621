"""CAN score accumulation in one pass over activations and gradients.

For every sample ``b`` and channel ``c`` it adds to ``out[b, :, c]`` the sums over valid positions
of ``|g|**alpha * |a|``, ``|a|`` and ``|g|``. The op is memory-bound (a few FLOPs per byte), so the
kernel reads ``a`` and ``g`` once, skips the loads of padding rows, and keeps the three running
sums in registers until the end of the sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._aot import AotSpec, Variant
from ._common import configs, prune_by_resources, size_bucket

# Exponents with a cheaper form than exp2(alpha * log2(|g|)); selected at compile time.
_ALPHA_ZERO = 0
_ALPHA_HALF = 1
_ALPHA_ONE = 2
_ALPHA_ANY = 3


def alpha_mode(alpha: float) -> int:
    """The compile-time form of ``|g|**alpha`` for ``alpha``."""
    return {0.0: _ALPHA_ZERO, 0.5: _ALPHA_HALF, 1.0: _ALPHA_ONE}.get(alpha, _ALPHA_ANY)


@triton.jit
def weighted_term(a, g, alpha, ALPHA_MODE: tl.constexpr):
    """``|g|**alpha * |a|`` for ``a = |a|``, ``g = |g|`` (fp32); shared by every score kernel."""
    if ALPHA_MODE == 0:
        # |g|**0 is 1 even where g == 0, as in torch.pow.
        return a
    elif ALPHA_MODE == 1:
        return tl.sqrt_rn(g) * a
    elif ALPHA_MODE == 2:
        return g * a
    else:
        # alpha > 0 here, so 0**alpha = 0; the inner where keeps log2 away from 0 (-inf).
        positive = g > 0
        power = tl.exp2(alpha * tl.log2(tl.where(positive, g, 1.0)))
        return tl.where(positive, power, 0.0) * a


# The autotune candidates on CUDA, checked ahead of time on sm_80 and sm_90 in every dtype and
# launcher variant (canfast.kernels.report). At most 16 elements of a tile per thread: the three
# float32 accumulators then fit without spills (32 per thread spilled in float32 on sm_90) and
# twice the warps stay resident, which a memory-bound loop needs to keep enough loads in flight.
CUDA_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_C": bc}, num_warps=w)
    for bt, bc, w in [
        (8, 128, 4),
        (16, 128, 4),
        (8, 256, 4),
        (16, 256, 8),
        (32, 128, 8),
        (8, 512, 8),
    ]
]


@triton.autotune(
    configs=configs(
        cuda=CUDA_CONFIGS,
        interpreter=triton.Config({"BLOCK_T": 16, "BLOCK_C": 32}),
    ),
    prune_configs_by={"early_config_prune": prune_by_resources("score_accumulate", "a_ptr")},
    key=["C", "t_bucket"],
    # Benchmarking runs the kernel several times; each run must start from the caller's sums.
    restore_value=["out_ptr"],
)
@triton.jit
def _score_accumulate_kernel(
    a_ptr,
    g_ptr,
    valid_ptr,
    out_ptr,
    T,
    C,
    t_bucket,
    alpha,
    stride_ab,
    stride_at,
    stride_ac,
    stride_gb,
    stride_gt,
    stride_gc,
    stride_vb,
    stride_vt,
    stride_ob,
    stride_os,
    stride_oc,
    HAS_VALID: tl.constexpr,
    ALPHA_MODE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    sample = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    a_base = a_ptr + sample * stride_ab + cols[None, :] * stride_ac
    g_base = g_ptr + sample * stride_gb + cols[None, :] * stride_gc

    # 2-D accumulators, reduced once at the end: fewer cross-thread reductions in the loop and a
    # pairwise-like summation order that loses less precision than one running scalar per column.
    weighted = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    abs_a = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    abs_g = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        if HAS_VALID:
            keep = tl.load(valid_ptr + sample * stride_vb + rows * stride_vt, mask=row_ok, other=0)
            row_ok = row_ok & (keep != 0)
        ok = row_ok[:, None] & col_ok[None, :]
        # Masked-out elements load as 0 and so add nothing, whatever alpha is (|a| = 0).
        a = tl.abs(tl.load(a_base + rows[:, None] * stride_at, mask=ok, other=0.0).to(tl.float32))
        g = tl.abs(tl.load(g_base + rows[:, None] * stride_gt, mask=ok, other=0.0).to(tl.float32))
        weighted += weighted_term(a, g, alpha, ALPHA_MODE)
        abs_a += a
        abs_g += g

    out = out_ptr + sample * stride_ob + cols * stride_oc
    # Each (sample, channel block) has one owner program, so a plain read-modify-write is safe.
    tl.store(out, tl.load(out, mask=col_ok) + tl.sum(weighted, axis=0), mask=col_ok)
    out += stride_os
    tl.store(out, tl.load(out, mask=col_ok) + tl.sum(abs_a, axis=0), mask=col_ok)
    out += stride_os
    tl.store(out, tl.load(out, mask=col_ok) + tl.sum(abs_g, axis=0), mask=col_ok)


AOT = AotSpec(
    kernel=_score_accumulate_kernel,
    configs=CUDA_CONFIGS,
    args=dict(
        a_ptr="*T",
        g_ptr="*T",
        valid_ptr="*u8",
        out_ptr="*fp32",
        T="i32",
        C="i32:16",
        t_bucket="i32:16",
        alpha="fp32",
        stride_ab="i32:16",
        stride_at="i32:16",
        stride_ac="1",
        stride_gb="i32:16",
        stride_gt="i32:16",
        stride_gc="1",
        stride_vb="i32",
        stride_vt="1",
        stride_ob="i32:16",
        stride_os="i32:16",
        stride_oc="1",
    ),
    variants=[
        Variant(
            f"{'valid ' * valid}alpha={mode}",
            dict(HAS_VALID=valid, ALPHA_MODE=mode),
            {} if valid else {"valid_ptr": "none", "stride_vb": "i32:16", "stride_vt": "i32:16"},
        )
        for valid in (False, True)
        for mode in (_ALPHA_ZERO, _ALPHA_HALF, _ALPHA_ONE, _ALPHA_ANY)
    ],
)


def score_accumulate(
    a: Tensor, g: Tensor, alpha: float, out: Tensor, valid: Tensor | None = None
) -> None:
    """Add per-sample, per-channel sums of ``|g|**alpha * |a|``, ``|a|``, ``|g|`` to ``out``.

    ``a``, ``g``: ``[B, T, C]`` (any strides); ``valid``: bool ``[B, T]`` or None; ``out``:
    float32 ``[B, 3, C]``, updated in place.
    """
    batch, length, channels = a.shape
    if batch == 0 or channels == 0:
        return
    if valid is not None:
        # Same bytes, but a uint8 pointer loads as plain integers on every Triton backend.
        valid = valid.view(torch.uint8)

    def grid(meta: dict) -> tuple[int, int]:
        return batch, triton.cdiv(channels, meta["BLOCK_C"])

    _score_accumulate_kernel[grid](
        a,
        g,
        valid,
        out,
        length,
        channels,
        size_bucket(length),
        float(alpha),
        *a.stride(),
        *g.stride(),
        *(valid.stride() if valid is not None else (0, 0)),
        *out.stride(),
        HAS_VALID=valid is not None,
        ALPHA_MODE=alpha_mode(float(alpha)),
    )
