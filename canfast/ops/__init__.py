"""The kernels behind canfast: each op declared once, run by one of several backends.

Ops (declared in :mod:`canfast.ops.contract`, each a ``torch.library`` custom op with a fake
implementation, so they trace under ``torch.compile``):

- :func:`score_accumulate`: per-sample, per-channel CAN score sums of an activation and its
  gradient;
- :func:`masked_linear`: a Linear with output and input masks (one, or a batch of masks over
  blocks of rows), differentiable in its input only; with a :class:`ScoreSink` its backward adds
  the CAN score of the layer's output (unit ``out``) or input (unit ``mid``, in the epilogue of
  the ``dL/dx`` product);
  (:class:`LinearPlan` checks its weight and masks once, for a layer called batch after batch);
- :func:`ablate_expand`: one copy of a site's output per neuron, that neuron removed.

Backends: ``torch`` (:mod:`canfast.ops.reference`, the truth the others are tested against),
``cpp`` (:mod:`canfast.ops.cpp` over ``canfast._C``, CPU) and ``triton`` (``canfast.kernels``,
CUDA). ``backend="auto"`` picks triton for CUDA tensors, cpp for CPU tensors, and the torch
reference when the chosen one is not installed (saying so once on stderr) or for float64.

Adding a backend is one new module and nothing else: define the four kernels with the
signatures of :class:`canfast.ops.registry.Backend` (the contract has already checked and
shaped every argument: 2-D rows, masks as ``[M, C]`` in the input's dtype, neurons in range)
and call ``canfast.ops.register(Backend(name=..., devices=..., auto_for=..., dtypes=..., ...))``
at import; ``torch_products=True`` says that its ``masked_linear`` and backward without masks
are torch's ``mm`` / ``addmm``, so unmasked calls may run as those. Once the module is
imported, ``backend="<name>"`` runs it, and ``auto`` picks it for the device types in
``auto_for``. Its tests: add its name to the backend lists of tests/test_ops.py, which hold
every backend to the reference.
"""

from __future__ import annotations

from canfast.ops.contract import (
    LinearPlan,
    ScoreSink,
    ablate_expand,
    check_alpha,
    masked_linear,
    score_accumulate,
)
from canfast.ops.registry import KERNEL_DTYPES, Backend, available, names, register, resolve

BACKENDS = names()

__all__ = [
    "BACKENDS",
    "KERNEL_DTYPES",
    "Backend",
    "LinearPlan",
    "ScoreSink",
    "ablate_expand",
    "available",
    "check_alpha",
    "masked_linear",
    "register",
    "resolve",
    "score_accumulate",
]
