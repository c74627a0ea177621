"""The ``torch`` backend: pure-PyTorch kernels, the truth the fast backends are tested against.

Each kernel here is the plain statement of what its op computes; the contract
(:mod:`canfast.ops.contract`) has checked and shaped the arguments. Also the fallback where no
compiled backend is installed, and the backend for float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from canfast.ops.registry import Backend, ScoreFeed, register


def score_accumulate(
    a: Tensor, g: Tensor, alpha: float, out: Tensor, valid: Tensor | None = None
) -> None:
    a32 = a.float().abs()
    g32 = g.float().abs()
    # torch.pow(0, 0) == 1, so alpha = 0 gives the mean |a| whatever the gradient is.
    weighted = g32.pow(alpha) * a32
    if valid is not None:
        # Select, not multiply: padding rows may hold inf or NaN (a fully masked attention row),
        # and 0 * NaN would leak them into the sums of valid rows.
        keep = valid.unsqueeze(-1)
        weighted, a32, g32 = (torch.where(keep, t, 0.0) for t in (weighted, a32, g32))
    out[:, 0] += weighted.sum(dim=1)
    out[:, 1] += a32.sum(dim=1)
    out[:, 2] += g32.sum(dim=1)


def apply_row_mask(t: Tensor, mask: Tensor | None) -> Tensor:
    """``t`` ([R, C]) times a mask [M, C], row block ``m`` of ``R / M`` rows using row ``m``."""
    if mask is None:
        return t
    blocks = mask.shape[0]
    rows = t.shape[0]
    view = t.reshape(blocks, rows // blocks, t.shape[-1]) * mask.unsqueeze(1)
    return view.reshape(t.shape)


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    out_mask: Tensor | None,
    in_mask: Tensor | None,
) -> Tensor:
    y = torch.nn.functional.linear(apply_row_mask(x, in_mask), weight, bias)
    return apply_row_mask(y, out_mask)


def masked_linear_backward(
    grad_y: Tensor,
    weight: Tensor,
    out_mask: Tensor | None,
    in_mask: Tensor | None,
    feed: ScoreFeed | None,
) -> Tensor:
    dx = apply_row_mask(apply_row_mask(grad_y, out_mask) @ weight, in_mask)
    if feed is not None:
        score_accumulate(feed.a, dx.reshape(feed.a.shape), feed.alpha, feed.out, feed.valid)
    return dx


def ablate_expand(
    y: Tensor, neurons: Tensor, mid: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    n = neurons.shape[0]
    expanded = y.unsqueeze(0).repeat(n, 1, 1)
    if mid is None:
        expanded[torch.arange(n, device=y.device), :, neurons] = 0
        return expanded
    # [n, R, 1] * [n, 1, N]: each copy's rank-1 term, in float32 (float64 stays float64: the
    # scan's precision checks run in it).
    acc = torch.promote_types(y.dtype, torch.float32)
    contribution = (
        mid[:, neurons].to(acc).t().unsqueeze(-1) * weight[:, neurons].to(acc).t()[:, None, :]
    )
    return (expanded.to(acc) - contribution).to(y.dtype)


register(
    Backend(
        name="torch",
        devices=frozenset({"cpu", "cuda", "mps", "xpu", "meta"}),
        auto_for=frozenset(),
        dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
        score_accumulate=score_accumulate,
        masked_linear=masked_linear,
        masked_linear_backward=masked_linear_backward,
        ablate_expand=ablate_expand,
        torch_products=True,
    )
)
