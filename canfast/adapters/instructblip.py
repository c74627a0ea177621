"""InstructBLIP: ViT, Q-Former (its query-token FFN), a projection, and a Llama/Vicuna or T5
language model."""

from canfast.adapters.base import Adapter, component_by_keyword


def _stream(path: str) -> str | None:
    if component_by_keyword(path) != "language":
        return None
    return "decoder" if ".decoder." in f".{path}." else "language"


ADAPTER = Adapter(
    family="instructblip",
    model_types=("instructblip",),
    task="causal",
    component_of=component_by_keyword,
    stream_of=_stream,
    uses_images=True,
    own_padding=(("qformer_", "qformer_tokenizer"),),
    extra_single_sites=(("language_projection", "down"),),
)
