"""Mixture-of-experts language models: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

transformers 5 keeps a layer's experts as stacked 3-D parameters of one module; canfast exposes
each expert's projections as Linear views (:mod:`canfast.adapters.views`), so expert ``k`` of
layer ``l`` has sites ``language.l.ek.gate|up|down`` (and ``.mid``), and a shared expert
``language.l.shared.*``.
"""

from canfast.adapters.base import Adapter

ADAPTER = Adapter(
    family="moe",
    model_types=("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
    task="causal",
    component_of=lambda path: "language",
    stream_of=lambda path: "language",
    notes="expert k of layer l: `language.l.ek.KIND`, shared expert: `language.l.shared.KIND`; "
    "an expert's scores average over the tokens routed to it",
)
