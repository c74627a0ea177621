"""One adapter per model family: where its FFN sites are and how it reads a sample."""

from __future__ import annotations

from pathlib import Path

from canfast.adapters import bert, causal_lm, instructblip, llava, moe, t5, vlm
from canfast.adapters.base import Adapter, Block, find_sites
from canfast.adapters.user_map import adapter_from_map
from canfast.errors import BadInput

ADAPTERS: tuple[Adapter, ...] = (
    llava.ADAPTER,
    instructblip.ADAPTER,
    *vlm.ADAPTERS,
    causal_lm.ADAPTER,
    moe.ADAPTER,
    bert.ADAPTER,
    t5.ADAPTER,
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_type: str, ffn_map: dict | str | Path | None = None) -> Adapter:
    """The adapter of ``model_type``, or the one a user's FFN map describes
    (:mod:`canfast.adapters.user_map`), which takes precedence."""
    if ffn_map is not None:
        return adapter_from_map(model_type, ffn_map)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise BadInput(
        f"unsupported architecture: canfast has no rule for the feed-forward blocks of model "
        f"type {model_type!r} (it knows {', '.join(a.family for a in ADAPTERS)}); describe them "
        "in a JSON map and pass --sites-map MAP.json (Python: ffn_map=...), see README "
        "'Other families'"
    )


__all__ = ["ADAPTERS", "Adapter", "Block", "adapter_for", "find_sites", "supported_model_types"]
