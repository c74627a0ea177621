"""BERT-family encoders with a masked-LM head (or a user-supplied objective)."""

from canfast.adapters.base import Adapter

ADAPTER = Adapter(
    family="bert",
    model_types=("bert", "roberta", "distilbert", "electra", "xlm-roberta"),
    task="masked",
    component_of=lambda path: "language",
    stream_of=lambda path: "language",
    notes="masked-LM objective",
)
