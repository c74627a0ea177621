"""LLaVA-1.5: CLIP vision tower, a two-layer projector, a Llama language model."""

from canfast.adapters.base import Adapter, component_by_keyword

ADAPTER = Adapter(
    family="llava",
    model_types=("llava",),
    task="causal",
    component_of=component_by_keyword,
    stream_of=lambda path: "language" if component_by_keyword(path) == "language" else None,
    prompt_template="USER: <image>\n{prompt} ASSISTANT:",
    uses_images=True,
    components=("vision", "projector", "language"),
    notes="LLaVA-1.5",
)
