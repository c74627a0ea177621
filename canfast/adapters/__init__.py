"""One adapter per model family: where its FFN sites are and how it reads a sample."""

from __future__ import annotations

from canfast.adapters import bert, causal_lm, instructblip, llava, moe, t5, vlm
from canfast.adapters.base import Adapter, Block, find_sites
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


def adapter_for(model_type: str) -> Adapter:
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise BadInput(
        f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
    )


__all__ = ["ADAPTERS", "Adapter", "Block", "adapter_for", "find_sites", "supported_model_types"]
