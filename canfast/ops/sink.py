"""ScoreSink: where the backward of a masked linear layer adds the CAN score of its output.

Shared by the cpp and triton backends, so either accepts the sink the caller built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ScoreSink:
    """``out`` is float32 ``[B, 3, N]`` (see ``score_accumulate``): the layer output's rows,
    flattened, split into ``B`` samples of equal length ``T``; ``valid`` is bool ``[B, T]`` or
    None; ``alpha`` the exponent of the gradient."""

    alpha: float
    out: Tensor
    valid: Tensor | None = None

    def check(self, y_shape: torch.Size) -> None:
        """Raise ValueError unless an output shaped ``y_shape`` splits into this sink's samples."""
        channels = y_shape[-1]
        rows = torch.Size(y_shape[:-1]).numel()
        if self.out.dim() != 3 or self.out.shape[1:] != (3, channels):
            raise ValueError(f"sink.out must be [B, 3, {channels}], got {tuple(self.out.shape)}")
        if self.out.dtype != torch.float32:
            raise ValueError(f"sink.out must be float32, got {self.out.dtype}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"sink.alpha must lie in [0, 1], got {self.alpha}")
        samples = self.out.shape[0]
        if samples == 0 or rows % samples:
            raise ValueError(f"{rows} output rows do not split into {samples} samples")
        if self.valid is not None and self.valid.shape != (samples, rows // samples):
            raise ValueError(
                f"sink.valid must be [{samples}, {rows // samples}], got {tuple(self.valid.shape)}"
            )

    def per_sample(self, t: Tensor) -> Tensor:
        """``t`` ([..., N]) as ``[B, T, N]``, the layout ``score_accumulate`` reads."""
        return t.reshape(self.out.shape[0], -1, t.shape[-1])

    def feed(self, accumulate: Callable, y: Tensor, grad_y: Tensor) -> None:
        """Add the score sums of ``y`` and ``dL/dy`` with a backend's ``score_accumulate``."""
        grad = self.per_sample(grad_y.to(y.dtype))
        accumulate(self.per_sample(y), grad, self.alpha, self.out, self.valid)


def needs_graph(x: Tensor, weight: Tensor, bias: Tensor | None, sink: ScoreSink | None) -> bool:
    """Whether a masked linear call must record autograd, checking a sink against it.

    A sink is fed by the backward pass, so it is an error where no backward will run.
    """
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if sink is not None:
        if not tracked:
            raise ValueError("a score sink is fed by the backward pass, but y will have no grad")
        sink.check(torch.Size((*x.shape[:-1], weight.shape[0])))
    return tracked
