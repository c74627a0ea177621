"""The kernels behind canfast, each with three backends: ``torch`` (the reference), ``cpp``
(``canfast._C``, CPU) and ``triton`` (``canfast.kernels``, CUDA).

``backend="auto"`` picks triton for CUDA tensors, cpp for CPU tensors, and the torch reference
when the chosen one is not installed; it says once on stderr which backend it fell back to.
"""

from __future__ import annotations

import importlib
import sys
from functools import cache
from types import ModuleType

import torch
from torch import Tensor

from canfast.ops import reference

BACKENDS = ("auto", "torch", "cpp", "triton")


@cache
def _module(backend: str) -> ModuleType | None:
    """The module implementing ``backend``, or None when it cannot be imported here."""
    name = {"torch": "canfast.ops.reference", "cpp": "canfast.ops.cpp", "triton": "canfast.kernels"}
    try:
        module = importlib.import_module(name[backend])
    except ImportError:
        return None
    return module if getattr(module, "AVAILABLE", True) else None


@cache
def _say_once(message: str) -> None:
    print(f"canfast: {message}", file=sys.stderr)


def available(backend: str) -> bool:
    """Whether ``backend`` can run in this installation."""
    return backend == "torch" or _module(backend) is not None


def resolve(backend: str, device_type: str) -> str:
    """The concrete backend that ``backend`` means for tensors on ``device_type``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        if not available(backend):
            raise RuntimeError(f"backend {backend!r} is not available in this installation")
        return backend
    wanted = "triton" if device_type == "cuda" else "cpp"
    if available(wanted):
        return wanted
    _say_once(f"{wanted} backend unavailable for {device_type} tensors; using the torch reference")
    return "torch"


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _impl(backend: str, tensor: Tensor) -> ModuleType:
    if backend == "auto" and tensor.dtype not in _KERNEL_DTYPES:
        # The compiled kernels cover the training dtypes; float64 (used for checking) runs on
        # the reference.
        return reference
    chosen = resolve(backend, tensor.device.type)
    return reference if chosen == "torch" else _module(chosen)


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

    ``a``, ``g``: ``[B, T, C]``; ``valid``: bool ``[B, T]`` or None; ``out``: float32
    ``[B, 3, C]``. Returns ``out``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return _impl(backend, a).score_accumulate(a, g, float(alpha), out, valid)


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    out_mask: Tensor | None = None,
    in_mask: Tensor | None = None,
    stats: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """``((x * in_mask) @ weight.T + bias) * out_mask``; masks are ``[C]`` or ``[M, C]``.

    When ``stats`` (float32 ``[N]``) is given, the per-channel sum of ``|y|`` is added to it.
    """
    return _impl(backend, x).masked_linear(x, weight, bias, out_mask, in_mask, stats)


def ablate_expand(
    y: Tensor,
    neurons: Tensor,
    mid: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """One copy of ``y`` per neuron in ``neurons``, that neuron removed (see the reference)."""
    return _impl(backend, y).ablate_expand(y, neurons, mid, weight)


__all__ = ["BACKENDS", "ablate_expand", "available", "masked_linear", "resolve", "score_accumulate"]
