"""Pure-PyTorch reference of every canfast kernel: the truth the fast backends are tested against.

Shapes and conventions (shared by every backend):
- ``score_accumulate``: ``a`` and ``g`` are ``[B, T, C]`` (one row of samples, their positions,
  channels); ``valid`` is a bool ``[B, T]`` or None; ``out`` is float32 ``[B, 3, C]`` and receives,
  added to what it holds, per sample and channel the sums over valid positions of
  ``|g|**alpha * |a|``, ``|a|`` and ``|g|``.
- ``masked_linear``: ``y = ((x * in_mask) @ W.T + b) * out_mask`` with ``W`` in ``nn.Linear``
  layout ``[N, K]``. A mask of shape ``[M, C]`` is a batch of masks: the rows of ``x`` (its first
  dimension) split into ``M`` equal blocks, block ``m`` using mask ``m``.
- ``ablate_expand``: one copy of a site's output per neuron, with that neuron removed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def score_accumulate(
    a: Tensor, g: Tensor, alpha: float, out: Tensor, valid: Tensor | None = None
) -> Tensor:
    a32 = a.float().abs()
    g32 = g.float().abs()
    # torch.pow(0, 0) == 1, so alpha = 0 gives the mean |a| whatever the gradient is.
    weighted = g32.pow(alpha) * a32
    if valid is not None:
        # Select, not multiply: padding rows may hold inf or NaN (a fully masked attention row),
        # and 0 * NaN would leak them into the sums of valid rows.
        keep = valid.to(torch.bool).unsqueeze(-1)
        weighted, a32, g32 = (torch.where(keep, t, 0.0) for t in (weighted, a32, g32))
    out[:, 0] += weighted.sum(dim=1)
    out[:, 1] += a32.sum(dim=1)
    out[:, 2] += g32.sum(dim=1)
    return out


def _apply_block_mask(t: Tensor, mask: Tensor | None) -> Tensor:
    """Multiply ``t`` ([R, ..., C]) by a mask [C] or a batch of masks [M, C] over blocks of R."""
    if mask is None:
        return t
    mask = mask.to(t.dtype)
    if mask.dim() == 1:
        return t * mask
    n_masks = mask.shape[0]
    rows = t.shape[0]
    if rows % n_masks:
        raise ValueError(f"{rows} rows do not split into {n_masks} mask blocks")
    blocks = t.reshape(n_masks, rows // n_masks, *t.shape[1:])
    view = mask.reshape(n_masks, *([1] * (t.dim() - 1)), mask.shape[-1])
    return (blocks * view).reshape(t.shape)


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    out_mask: Tensor | None = None,
    in_mask: Tensor | None = None,
    stats: Tensor | None = None,
) -> Tensor:
    y = torch.nn.functional.linear(_apply_block_mask(x, in_mask), weight, bias)
    y = _apply_block_mask(y, out_mask)
    if stats is not None:
        stats += y.detach().float().abs().reshape(-1, y.shape[-1]).sum(dim=0)
    return y


def ablate_expand(
    y: Tensor, neurons: Tensor, mid: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    """Return ``[n, *y.shape]``: copy ``i`` is ``y`` with neuron ``neurons[i]`` removed.

    Unit ``out`` (``mid`` is None): channel ``neurons[i]`` of ``y`` is zeroed.
    Unit ``mid``: ``y`` is a down projection's output, ``mid`` its input ``[..., K]`` and
    ``weight`` its ``[N, K]`` matrix; copy ``i`` is ``y - mid[..., j] * weight[:, j]``.
    """
    n = neurons.shape[0]
    expanded = y.unsqueeze(0).repeat(n, *([1] * y.dim()))
    if mid is None:
        expanded[torch.arange(n, device=y.device), ..., neurons] = 0
        return expanded
    # At least float32, and float64 stays float64 (the precision checks run in it).
    acc = torch.promote_types(y.dtype, torch.float32)
    # The channel count is spelled out: reshape cannot infer -1 when there are no neurons.
    contribution = mid[..., neurons].to(acc).movedim(-1, 0).unsqueeze(-1) * weight[:, neurons].to(
        acc
    ).t().reshape(n, *([1] * (y.dim() - 1)), y.shape[-1])
    return (expanded.to(acc) - contribution).to(y.dtype)
