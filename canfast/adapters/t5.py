"""T5 and Flan-T5 encoder-decoders; decoder blocks are numbered after the encoder blocks."""

from canfast.adapters.base import Adapter

ADAPTER = Adapter(
    family="t5",
    model_types=("t5", "mt5"),
    task="seq2seq",
    component_of=lambda path: "language",
    stream_of=lambda path: "decoder" if path.startswith("decoder") else "language",
    notes="decoder layers numbered after the encoder layers",
)
