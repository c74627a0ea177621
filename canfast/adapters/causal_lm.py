"""Decoder-only language models: Llama, Mistral, Qwen2, GPT-2 (Conv1D), OPT, GPT-NeoX."""

from canfast.adapters.base import Adapter

ADAPTER = Adapter(
    family="causal-lm",
    model_types=(
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "phi3",
        "gpt2",
        "opt",
        "gpt_neox",
    ),
    task="causal",
    component_of=lambda path: "language",
    stream_of=lambda path: "language",
)
