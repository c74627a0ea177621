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


def _shared_memory_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    # The opt-in maximum per program; older torch builds name only the default 48 KB one.
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block


def _arch(device: torch.device) -> str | None:
    """The arch whose compiled resources stand for this device's (sm_8x share sm_80's)."""
    major, _ = torch.cuda.get_device_capability(device)
    return {8: "sm_80", 9: "sm_90"}.get(major)


def dtype_label(dtype: torch.dtype, precision: str | None) -> str:
    """The report's name for a data dtype and dot precision: fp32, fp32-tf32, bf16, fp16."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return name + "-tf32" if name == "fp32" and precision == "tf32" else name


def config_label(config: triton.Config) -> str:
    """A config's name in the report and the resource table: tile sizes, stages, warps."""
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks} s{config.num_stages} w{config.num_warps}"


def keeps(
    kernel: str, arch: str, dtype: str, config: triton.Config, shared_limit: int, split: str = ""
) -> bool:
    """Whether the compiled-resource table lets ``config`` run: no spills, and shared memory
    within ``shared_limit``. A config missing from the table is kept (nothing is known)."""
    from ._resources import RESOURCES

    entry = RESOURCES.get(kernel, {}).get((arch, dtype, config_label(config), split))
    if entry is None:
        return True
    shared, spilled = entry
    return not spilled and shared <= shared_limit


def prune_by_resources(kernel: str, data_arg: str, split: str | None = None):
    """An ``early_config_prune`` for ``triton.autotune``: drop the configs that the compiled
    resource table (kernels/_resources.py, written by bench/aot.py from the AOT report) shows
    spilling or overflowing this device's shared memory, for this dtype and arch.

    The shipped lists are clean on sm_80 and sm_90 by construction (tests/test_kernels_aot.py
    checks the table keeps all of them), so on A100 and H100 this is a safety net; it does drop
    configs on GPUs with less shared memory per block (sm_86, sm_89: 99 KB). Devices of another
    generation than sm_8x / sm_90 keep every config. If nothing is left, the config with the
    least shared memory is kept, so the kernel still runs. ``split`` names a
    constexpr whose value selects a separate part of the table.
    """

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        data = named_args[data_arg]
        if data.device.type != "cuda":
            return configs
        arch = _arch(data.device)
        if arch is None:
            return configs
        dtype = dtype_label(data.dtype, kwargs.get("DOT_PRECISION"))
        limit = _shared_memory_limit(data.device)
        part = str(bool(kwargs.get(split))) if split else ""
        kept = [c for c in configs if keeps(kernel, arch, dtype, c, limit, part)]
        if kept:
            return kept
        from ._resources import RESOURCES

        table = RESOURCES.get(kernel, {})
        return [
            min(configs, key=lambda c: table.get((arch, dtype, config_label(c), part), (0, 0))[0])
        ]

    return prune
