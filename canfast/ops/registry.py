"""The backends of canfast's ops: what each one provides, and which one runs a call.

A backend is a :class:`Backend` record of kernels, handed to :func:`register` when its module is
imported. The contract (:mod:`canfast.ops.contract`) checks every argument before a kernel sees
it, so kernels receive canonical inputs only (see :class:`Backend`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

# The built-in backends, imported on first use; any other module registers itself on import.
_BUILTIN = {"torch": "canfast.ops.reference", "cpp": "canfast.ops.cpp", "triton": "canfast.kernels"}
_REGISTERED: dict[str, Backend] = {}
# Where the built-in backends are wanted by `auto`, known before importing them.
_AUTO_BUILTIN = {"cpp": ("cpu",), "triton": ("cuda",)}

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ScoreFeed:
    """What the backward of ``masked_linear`` adds the unit-``mid`` CAN score into.

    ``a`` is the layer input as ``[B, T, K]`` (one row of samples); the gradient is ``dL/dx``,
    which the backward computes, and its sums go to ``out`` (float32 ``[B, 3, K]``, added to) over
    the rows that ``valid`` (bool ``[B, T]`` or None) keeps.
    """

    a: Tensor
    alpha: float
    out: Tensor
    valid: Tensor | None


@dataclass(frozen=True)
class Backend:
    """One backend's kernels. Every tensor a kernel gets has been checked by the contract.

    - ``score_accumulate(a, g, alpha, out, valid)``: ``a``, ``g`` ``[B, T, C]`` of one dtype,
      ``out`` float32 ``[B, 3, C]`` (added to), ``valid`` bool ``[B, T]`` or None.
    - ``masked_linear(x, weight, bias, out_mask, in_mask) -> y``: ``x`` ``[R, K]``, ``weight``
      ``[N, K]`` (any strides), ``bias`` ``[N]`` or None, masks ``[M, C]`` in x's dtype with
      ``M`` dividing ``R`` (block ``m`` of rows uses mask row ``m``) or None; ``y`` ``[R, N]``.
    - ``masked_linear_backward(grad_y, weight, out_mask, in_mask, feed) -> dx``: ``dL/dx =
      ((grad_y * out_mask) @ weight) * in_mask`` as ``[R, K]``; with a :class:`ScoreFeed`, the
      CAN sums of ``(feed.a, dL/dx)`` are added to ``feed.out`` as the product is finished.
    - ``ablate_expand(y, neurons, mid, weight) -> [n, R, N]``: ``y`` ``[R, N]``, ``neurons``
      int64 in range on y's device; ``mid`` ``[R, K]`` and ``weight`` ``[N, K]`` for unit mid.

    ``devices``: the device types it runs on; ``auto_for``: those ``backend="auto"`` picks it
    for; ``dtypes``: the element types its kernels take. ``torch_products``: its
    ``masked_linear`` and ``masked_linear_backward`` without masks are torch's own ``addmm`` /
    ``mm`` (their results, bit for bit), so the contract may run an unmasked call that autograd
    tracks as those torch ops (see :class:`canfast.ops.LinearPlan`).
    """

    name: str
    devices: frozenset[str]
    auto_for: frozenset[str]
    dtypes: tuple[torch.dtype, ...]
    score_accumulate: Callable[..., None]
    masked_linear: Callable[..., Tensor]
    masked_linear_backward: Callable[..., Tensor]
    ablate_expand: Callable[..., Tensor]
    torch_products: bool = False


def register(backend: Backend) -> None:
    """Make ``backend`` available by its name (called by the backend's module on import)."""
    _REGISTERED[backend.name] = backend
    _CHOSEN.clear()


@cache
def _load_builtin(name: str) -> bool:
    try:
        importlib.import_module(_BUILTIN[name])
    except ImportError:
        return False
    return name in _REGISTERED


def _get(name: str) -> Backend | None:
    if name not in _REGISTERED and name in _BUILTIN:
        _load_builtin(name)
    return _REGISTERED.get(name)


def names() -> tuple[str, ...]:
    """``"auto"`` and every backend known by name, built in or registered."""
    return ("auto", *_BUILTIN, *(n for n in _REGISTERED if n not in _BUILTIN))


def available(backend: str) -> bool:
    """Whether ``backend`` can run in this installation."""
    return _get(backend) is not None


@cache
def _say_once(message: str) -> None:
    print(f"canfast: {message}", file=sys.stderr)


def resolve(backend: str, device_type: str) -> str:
    """The concrete backend that ``backend`` means for tensors on ``device_type``."""
    known = names()
    if backend not in known:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(known)}")
    if backend != "auto":
        if not available(backend):
            raise RuntimeError(f"backend {backend!r} is not available in this installation")
        return backend
    for name in known[1:]:
        if name == "torch":
            continue
        if name in _BUILTIN and device_type not in _AUTO_BUILTIN.get(name, ()):
            continue  # skip importing a backend that would not be picked anyway
        found = _get(name)
        if found is not None and device_type in found.auto_for:
            return name
    if device_type in ("cpu", "cuda"):
        wanted = "triton" if device_type == "cuda" else "cpp"
        _say_once(
            f"{wanted} backend unavailable for {device_type} tensors; using the torch reference"
        )
    return "torch"


# (backend asked for, device type, dtype) -> the backend that runs it; every op call asks.
_CHOSEN: dict[tuple[str, str, torch.dtype], Backend] = {}


def kernels_for(backend: str, op: str, tensor: Tensor) -> Backend:
    """The backend that runs ``op`` on ``tensor`` (device and dtype checked against it)."""
    key = (backend, tensor.device.type, tensor.dtype)
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        return chosen
    if backend == "auto" and tensor.dtype not in KERNEL_DTYPES:
        # The compiled kernels cover the training dtypes; float64 (used for checking) runs on
        # the reference.
        return _get("torch")
    chosen = _get(resolve(backend, tensor.device.type))
    if tensor.device.type not in chosen.devices:
        raise ValueError(
            f"{op}: the {chosen.name} backend runs on {'/'.join(sorted(chosen.devices))} "
            f"tensors, got {tensor.device}"
        )
    if tensor.dtype not in chosen.dtypes:
        kinds = ", ".join(str(d).removeprefix("torch.") for d in chosen.dtypes)
        raise ValueError(f"{op}: the {chosen.name} backend computes in {kinds}, got {tensor.dtype}")
    _CHOSEN[key] = chosen
    return chosen


def by_name(name: str) -> Backend:
    """A backend already chosen by :func:`kernels_for` (used inside the registered ops)."""
    found = _get(name)
    if found is None:
        raise RuntimeError(f"backend {name!r} is not available in this installation")
    return found
