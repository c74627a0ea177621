"""Helpers shared by the Triton kernels: interpreter detection, config lists, device checks."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Read once at import, like Triton itself: `triton.jit` decides between compiling and interpreting
# when the kernel is defined, so the config choice must follow the same moment.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The grid's second and third axes are limited to 65535 programs on CUDA.
MAX_GRID_AXIS = 65535


def configs(cuda: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotune candidates: the CUDA list, or one small config under the interpreter.

    With a single config `triton.autotune` skips benchmarking, which in the interpreter would run
    every candidate through numpy and take minutes.
    """
    return [interpreter] if INTERPRET else cuda


def size_bucket(n: int) -> int:
    """``n`` rounded up to a power of two: an autotune key that does not re-tune per length."""
    return 1 << max(n - 1, 0).bit_length()


def check_tensors(op: str, *tensors: Tensor | None) -> torch.device:
    """Raise unless the given tensors share one device that Triton can run on; return it."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present[1:]:
        if t.device != device:
            raise ValueError(f"{op}: tensors on {device} and {t.device}; put them on one device")
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"{op}: the triton backend needs CUDA tensors (got {device}); "
            "set TRITON_INTERPRET=1 to run it on the CPU"
        )
    return device


def check_dtypes(op: str, *tensors: Tensor | None) -> torch.dtype:
    """Raise unless the given tensors share one dtype the kernels compute in; return it."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    if dtype not in _TL_DTYPES:
        raise ValueError(f"{op}: unsupported dtype {dtype}; use float32, bfloat16 or float16")
    for t in present[1:]:
        if t.dtype != dtype:
            raise ValueError(f"{op}: mixed dtypes {dtype} and {t.dtype}")
    return dtype


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small stand-in under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def dot_precision(dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision matching what torch would do for ``dtype``.

    Triton defaults to TF32 for float32 operands; torch does so only when the user allowed it,
    and the float32 tolerance of the tests (1e-5) is far below TF32's 10-bit mantissa.
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The operand type of ``tl.dot`` for inputs of ``dtype``.

    The interpreter stores bfloat16 as raw uint16 and multiplies the bit patterns in ``tl.dot``
    (triton-lang/triton#11584, not supported upstream), so there bfloat16 operands go in as
    float32. That is exact: products of bfloat16 values fit in float32, as on the tensor cores.
    """
    if dtype not in _TL_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    if INTERPRET and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def _shared_memory_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    # The opt-in maximum per program; older torch builds name only the default 48 KB one.
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block


def matmul_shared_bytes(config: triton.Config, element_bytes: int) -> int:
    """Shared memory a pipelined matmul config needs: one x and one w tile per stage.

    Triton's software pipeline keeps ``num_stages - 1`` tiles in flight on sm_80 and
    ``num_stages`` on sm_90; counting ``num_stages`` bounds both (checked against the compiled
    kernels in tests/test_kernels_aot.py).
    """
    kw = config.kwargs
    tile = (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * element_bytes
    return config.num_stages * tile


def prune_by_shared_memory(configs: list[triton.Config], named_args: dict, **kwargs) -> list:
    """Autotune pruning: drop the matmul configs whose pipeline does not fit in shared memory.

    A float32 input needs twice the shared memory of a bfloat16 one for the same tiles, and
    GPUs differ (227 KB per program on H100, 163 KB on A100, 99 KB on consumer Ampere), so the
    config list is cut per call. The smallest config is kept if none fits.
    """
    x = named_args["x_ptr"]
    if x.device.type != "cuda":
        return configs
    limit = _shared_memory_limit(x.device)
    need = {c: matmul_shared_bytes(c, x.element_size()) for c in configs}
    fitting = [c for c in configs if need[c] <= limit]
    return fitting or [min(configs, key=need.__getitem__)]
