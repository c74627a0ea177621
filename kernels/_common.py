"""Helpers shared by the Triton kernels: interpreter detection, config lists, dot settings."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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
