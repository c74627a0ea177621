"""Decoder-only language models: Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, GPT-2 (Conv1D), OPT,
GPT-NeoX."""

from canfast.adapters.base import Adapter

ADAPTER = Adapter(
    family="causal-lm",
    model_types=(
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "gpt2",
        "opt",
        "gpt_neox",
    ),
    task="causal",
    component_of=lambda path: "language",
    stream_of=lambda path: "language",
    notes="Phi-3's fused gate_up_proj is split into gate and up halves by views",
)
