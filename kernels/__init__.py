"""Triton kernels of canfast (the ``triton`` backend of :mod:`canfast.ops`), for CUDA tensors.

Installed as ``canfast.kernels``. Each op lives in its own module with its kernel, its launchers
and, where it has a backward, its ``torch.autograd.Function``. With ``TRITON_INTERPRET=1`` set
before import, the same kernels run on CPU tensors through Triton's interpreter (that is how the
tests check them without a GPU).

The package imports without Triton; ``AVAILABLE`` then is False and no op is defined.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError:
    AVAILABLE = False
else:
    AVAILABLE = True

if AVAILABLE:
    from .ablate_expand import ablate_expand
    from .masked_linear import (
        MaskedLinearFunction,
        ScoreSink,
        masked_linear,
        masked_linear_backward,
        masked_linear_forward,
    )
    from .score_accumulate import score_accumulate

    __all__ = [
        "AVAILABLE",
        "MaskedLinearFunction",
        "ScoreSink",
        "ablate_expand",
        "masked_linear",
        "masked_linear_backward",
        "masked_linear_forward",
        "score_accumulate",
    ]
else:
    __all__ = ["AVAILABLE"]
