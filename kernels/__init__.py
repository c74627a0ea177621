"""Triton kernels of canfast: the ``triton`` backend of :mod:`canfast.ops`, for CUDA tensors.

Installed as ``canfast.kernels``. Each op lives in its own module with its kernel and a plain
launcher per direction; importing the package registers them with :mod:`canfast.ops`, whose
contract checks every argument and holds the autograd formula. With ``TRITON_INTERPRET=1`` set
before import, the same kernels run on CPU tensors through Triton's interpreter (that is how
the tests check them without a GPU).

The package imports without Triton; ``AVAILABLE`` then is False and nothing is registered.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError:
    AVAILABLE = False
else:
    AVAILABLE = True

if AVAILABLE:
    import torch

    from canfast.ops.registry import Backend, register

    from ._common import INTERPRET
    from .ablate_expand import ablate_expand
    from .masked_linear import masked_linear, masked_linear_backward
    from .score_accumulate import score_accumulate

    register(
        Backend(
            name="triton",
            devices=frozenset({"cuda", "cpu"} if INTERPRET else {"cuda"}),
            auto_for=frozenset({"cuda"}),
            dtypes=(torch.float32, torch.bfloat16, torch.float16),
            score_accumulate=score_accumulate,
            masked_linear=masked_linear,
            masked_linear_backward=masked_linear_backward,
            ablate_expand=ablate_expand,
        )
    )
    __all__ = [
        "AVAILABLE",
        "ablate_expand",
        "masked_linear",
        "masked_linear_backward",
        "score_accumulate",
    ]
else:
    __all__ = ["AVAILABLE"]
