"""One copy of a site's output per neuron, with that neuron removed, written in one kernel.

Copy ``i`` of ``y`` (``[..., N]``) has neuron ``j = neurons[i]`` removed: channel ``j`` zeroed
(unit ``out``), or, for unit ``mid``, the neuron's contribution to a down projection taken back
out, ``y - mid[..., j] * W[:, j]`` (a rank-1 correction, so the projection is not recomputed).

The op is a pure write stream: each program loads one tile of ``y`` once and writes it into a
range of copies, so ``y`` is read once however many copies there are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._aot import AotSpec, Variant
from ._common import MAX_GRID_AXIS, configs, multiprocessor_count, prune_by_resources, size_bucket

# Enough programs to keep every multiprocessor busy when y has few tiles (one position in a
# scan); beyond that, more copy groups only reload the same tile.
_PROGRAMS_PER_MULTIPROCESSOR = 4


# The autotune candidates on CUDA, checked ahead of time on sm_80 and sm_90 in every dtype and
# launcher variant (canfast.kernels.report).
CUDA_CONFIGS = [
    triton.Config({"BLOCK_P": bp, "BLOCK_N": bn}, num_warps=w)
    for bp, bn, w in [
        (8, 256, 4),
        (16, 128, 4),
        (16, 256, 4),
        (32, 128, 4),
        (32, 256, 8),
        (64, 64, 4),
    ]
]


@triton.autotune(
    configs=configs(
        cuda=CUDA_CONFIGS,
        interpreter=triton.Config({"BLOCK_P": 8, "BLOCK_N": 32}),
    ),
    prune_configs_by={"early_config_prune": prune_by_resources("ablate_expand", "y_ptr")},
    key=["N", "p_bucket", "UNIT_MID"],
)
@triton.jit
def _ablate_expand_kernel(
    y_ptr,
    neurons_ptr,
    mid_ptr,
    w_ptr,
    out_ptr,
    P,
    N,
    K,
    n_copies,
    p_bucket,
    stride_yp,
    stride_yn,
    stride_mp,
    stride_mk,
    stride_wn,
    stride_wk,
    stride_oi,
    stride_op,
    stride_on,
    UNIT_MID: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_p = tl.program_id(0) // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < P
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    tile = tl.load(y_ptr + rows64[:, None] * stride_yp + cols[None, :] * stride_yn, mask=ok)
    if UNIT_MID:
        tile = tile.to(tl.float32)
    out_tile = out_ptr + rows64[:, None] * stride_op + cols[None, :] * stride_on

    per_group = tl.cdiv(n_copies, tl.num_programs(1))
    first = tl.program_id(1) * per_group
    last = tl.minimum(first + per_group, n_copies)
    # A running pointer: i * stride_oi can pass 2**31 elements for many large copies.
    out_copy = out_tile + first.to(tl.int64) * stride_oi
    for i in range(first, last):
        j = tl.load(neurons_ptr + i)
        if UNIT_MID:
            m = tl.load(mid_ptr + rows64 * stride_mp + j * stride_mk, mask=row_ok, other=0.0)
            w = tl.load(w_ptr + cols * stride_wn + j * stride_wk, mask=col_ok, other=0.0)
            copy = tile - m.to(tl.float32)[:, None] * w.to(tl.float32)[None, :]
        else:
            copy = tl.where(cols[None, :] == j, 0.0, tile)
        tl.store(out_copy, copy.to(out_ptr.dtype.element_ty), mask=ok)
        out_copy += stride_oi


AOT = AotSpec(
    kernel=_ablate_expand_kernel,
    configs=CUDA_CONFIGS,
    args=dict(
        y_ptr="*T",
        neurons_ptr="*i64",
        mid_ptr="*T",
        w_ptr="*T",
        out_ptr="*T",
        P="i32",
        N="i32:16",
        K="i32:16",
        n_copies="i32",
        p_bucket="i32:16",
        stride_yp="i32:16",
        stride_yn="1",
        stride_mp="i32:16",
        stride_mk="1",
        stride_wn="i32:16",
        stride_wk="1",
        stride_oi="i32:16",
        stride_op="i32:16",
        stride_on="1",
    ),
    variants=[
        Variant(
            "unit=out",
            dict(UNIT_MID=False),
            dict(mid_ptr="none", w_ptr="none", stride_mk="i32:16", stride_wk="i32:16"),
        ),
        Variant("unit=mid", dict(UNIT_MID=True)),
    ],
)


def ablate_expand(
    y: Tensor, neurons: Tensor, mid: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    """Return ``[n, R, N]``: copy ``i`` is ``y`` (``[R, N]``) with neuron ``neurons[i]`` removed.

    Unit ``out`` (``mid`` is None): channel ``neurons[i]`` of ``y`` is zeroed. Unit ``mid``:
    ``mid`` ``[R, K]`` and ``weight`` ``[N, K]`` (any strides); copy ``i`` is
    ``y - mid[:, j] * weight[:, j]``, computed in float32.
    """
    positions, channels = y.shape
    unit_mid = mid is not None
    n_copies = neurons.shape[0]
    out = torch.empty(n_copies, positions, channels, dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    target = _PROGRAMS_PER_MULTIPROCESSOR * multiprocessor_count(y.device)

    def grid(meta: dict) -> tuple[int, int]:
        tiles = triton.cdiv(positions, meta["BLOCK_P"]) * triton.cdiv(channels, meta["BLOCK_N"])
        groups = min(n_copies, MAX_GRID_AXIS, max(1, triton.cdiv(target, tiles)))
        return tiles, groups

    _ablate_expand_kernel[grid](
        y,
        neurons,
        mid,
        weight,
        out,
        positions,
        channels,
        mid.shape[-1] if unit_mid else 0,
        n_copies,
        size_bucket(positions),
        *y.stride(),
        *(mid.stride() if unit_mid else (0, 0)),
        *(weight.stride() if unit_mid else (0, 0)),
        *out.stride(),
        UNIT_MID=unit_mid,
    )
    return out
