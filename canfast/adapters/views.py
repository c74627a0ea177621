"""Linear views: FFN projections that live inside a larger parameter, made into modules.

Two layouts keep FFN projections out of reach of per-module hooks:

- a fused gate and up projection (Phi-3's ``gate_up_proj``, one Linear of ``2I`` outputs whose
  first ``I`` rows are the gate and the last ``I`` the up projection, as its forward's
  ``chunk(2)`` reads them);
- stacked experts (transformers 5 mixture-of-experts: ``experts.gate_up_proj`` ``[E, 2I, H]`` and
  ``experts.down_proj`` ``[E, H, I]`` parameters of one module).

A :class:`LinearView` is an ``nn.Linear``-like module whose ``weight`` is a view (never a copy)
into such a parameter, so hooks, ``masked_linear`` and weight zeroing act on it as on any Linear,
and writes through it reach the model's own parameter. It owns no parameter: the model's
``state_dict`` and parameter count are unchanged.

The owner's forward is replaced (per instance, bound with ``types.MethodType`` so that
``copy.deepcopy`` rebinds it) by one that computes the same thing through the views. The
replacement happens once, when canfast first maps the model's sites; tests check that outputs
are unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Marks an owner whose forward canfast replaced (value: what replaced it).
EXPOSED = "_canfast_exposed"


class LinearView(nn.Module):
    """A Linear whose weight is ``getattr(owner, param)[index]``, a view into the owner's
    parameter. ``index`` is an expert number, a row slice, or both (``(expert, rows)``)."""

    def __init__(self, owner: nn.Module, param: str, index, bias: str | None = None) -> None:
        super().__init__()
        # Not a registered child: the owner is this module's parent, and a cycle would make
        # named_modules and state_dict walk forever.
        self.__dict__["_owner"] = owner
        self.param = param
        self.index = index
        self.bias_param = bias
        weight = self.weight
        self.out_features, self.in_features = weight.shape
        # Set by a routed forward (stacked experts): the rows of the flattened token batch that
        # this call saw, and how many rows that batch had. None when every row passes.
        self.routed_rows: Tensor | None = None
        self.routed_total: int | None = None

    @property
    def weight(self) -> Tensor:
        return getattr(self._owner, self.param)[self.index]

    @property
    def bias(self) -> Tensor | None:
        if self.bias_param is None:
            return None
        return getattr(self._owner, self.bias_param)[self.index]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"view of {self.param}[{self.index}]"
        )


def is_linear_view(module: nn.Module) -> bool:
    return isinstance(module, LinearView)


# ----- fused gate and up projections -----------------------------------------------------------


def _fused_forward(self: nn.Linear, x: Tensor) -> Tensor:
    # The same [gate; up] output as the fused Linear, computed through the two halves so that
    # each half's hooks and masks apply.
    return torch.cat([self.gate(x), self.up(x)], dim=-1)


def split_fused_gate_up(model: nn.Module, name: str = "gate_up_proj") -> int:
    """Give every fused ``name`` Linear a ``gate`` and an ``up`` view child (its first and last
    halves of output rows) and route its forward through them. Returns how many were split."""
    count = 0
    for module in list(model.modules()):
        fused = getattr(module, name, None)
        if not isinstance(fused, nn.Linear) or getattr(fused, EXPOSED, None):
            continue
        if fused.out_features % 2:
            continue
        half = fused.out_features // 2
        bias = "bias" if fused.bias is not None else None
        fused.add_module("gate", LinearView(fused, "weight", slice(0, half), bias))
        fused.add_module("up", LinearView(fused, "weight", slice(half, 2 * half), bias))
        fused.forward = types.MethodType(_fused_forward, fused)
        setattr(fused, EXPOSED, "gate_up")
        count += 1
    return count


# ----- stacked experts -------------------------------------------------------------------------


def is_stacked_experts(module: nn.Module) -> bool:
    """transformers 5's expert layout: 3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj``
    [E, H, I] parameters in one module, gate rows first (``is_concatenated``)."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3
        and down.dim() == 3
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and getattr(module, "has_gate", True)
        and not getattr(module, "has_post_expert_norm", False)
    )


class Expert(nn.Module):
    """One expert's three projections, each a :class:`LinearView` into the stacked weights."""

    def __init__(self, experts: nn.Module, e: int) -> None:
        super().__init__()
        inter = experts.gate_up_proj.shape[1] // 2
        bias = getattr(experts, "has_bias", False)
        up_bias = "gate_up_proj_bias" if bias else None
        down_bias = "down_proj_bias" if bias else None
        self.gate_proj = LinearView(experts, "gate_up_proj", (e, slice(0, inter)), up_bias)
        self.up_proj = LinearView(experts, "gate_up_proj", (e, slice(inter, 2 * inter)), up_bias)
        self.down_proj = LinearView(experts, "down_proj", e, down_bias)


def _watched(view: LinearView) -> bool:
    """Whether canfast (or anyone) hooks, masks or scores this view right now."""
    return bool(view._forward_hooks or view._forward_pre_hooks or "forward" in vars(view))


def _run(view: LinearView, x: Tensor, rows: Tensor, total: int) -> Tensor:
    """``view`` applied to the routed rows ``x`` (the rows ``rows`` of a ``total``-row batch).

    While the view is watched, the rows go back to their places in a zero-filled batch and the
    view runs over all of it: a batch of masks splits the batch's rows into blocks, one per
    mask, and scoring reads rows per sample, orders the routed rows alone have lost. Scoring
    counts only the routed rows (``routed_rows``). Unwatched, only the routed rows are computed.
    """
    view.routed_rows, view.routed_total = rows, total
    if not _watched(view):
        return view(x)
    full = x.new_zeros(total, x.shape[-1])
    full[rows] = x
    return view(full)[rows]


def _experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    # transformers' eager expert loop, with each projection a LinearView of its expert.
    final = torch.zeros_like(hidden_states)
    total = hidden_states.shape[0]
    with torch.no_grad():
        hits = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(hits.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
    for e in hit:
        if e >= self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(hits[e])
        expert = self.canfast_experts[e]
        x = hidden_states[token_idx]
        gate = _run(expert.gate_proj, x, token_idx, total)
        up = _run(expert.up_proj, x, token_idx, total)
        out = _run(expert.down_proj, self.act_fn(gate) * up, token_idx, total)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def expose_experts(model: nn.Module) -> int:
    """Give every stacked-experts module ``canfast_experts`` (one :class:`Expert` of views per
    expert) and route its forward through them. Returns how many modules were exposed."""
    count = 0
    for module in list(model.modules()):
        if not is_stacked_experts(module) or getattr(module, EXPOSED, None):
            continue
        if not hasattr(module, "act_fn") or not hasattr(module, "num_experts"):
            continue
        module.canfast_experts = nn.ModuleList(
            Expert(module, e) for e in range(module.gate_up_proj.shape[0])
        )
        module.forward = types.MethodType(_experts_forward, module)
        setattr(module, EXPOSED, "experts")
        count += 1
    return count
