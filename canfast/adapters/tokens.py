"""Inputs that run along a sample's token sequence, whatever the family.

Besides ``input_ids`` and ``attention_mask``, current processors give per-token inputs of their
own: token types (PaliGemma's prefix/suffix, Gemma 3's image tokens), Qwen-VL's
``mm_token_type_ids``, Mllama's ``cross_attention_mask`` ``[B, T, images, tiles]``. Appending an
answer to a prompt, or padding a batch, must extend every one of them with the tokens; other
inputs (``pixel_values``, ``pixel_attention_mask``, ``image_sizes``, ...) are per image.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Inputs that run along the token sequence ([B, T, ...]): padded with it, extended by targets.
TOKEN_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "mm_token_type_ids",
    "cross_attention_mask",
)


def extend_tokens(encoded: dict[str, Tensor], target: Tensor, token_type: int) -> None:
    """Append ``target`` ([1, n] ids) to a prompt's encoding, and every per-token input with it:
    attention 1, token type ``token_type`` (PaliGemma marks its suffix with 1), and Mllama's
    cross-attention mask repeated from the last prompt token (answers see the image too)."""
    n = target.shape[1]
    encoded["input_ids"] = torch.cat([encoded["input_ids"], target], dim=1)
    for key in TOKEN_KEYS[1:]:
        if key not in encoded:
            continue
        t = encoded[key]
        if key == "cross_attention_mask" and t.shape[1]:
            tail = t[:, -1:].expand(-1, n, *t.shape[2:])
        else:
            value = {"attention_mask": 1, "token_type_ids": token_type}.get(key, 0)
            tail = torch.full((t.shape[0], n, *t.shape[2:]), value, dtype=t.dtype)
        encoded[key] = torch.cat([t, tail.to(t.device)], dim=1)


def trim_tokens(encoded: dict[str, Tensor], length: int) -> None:
    """Cut every per-token input of a prompt's encoding to its first ``length`` tokens."""
    for key in TOKEN_KEYS:
        if key in encoded:
            encoded[key] = encoded[key][:, :length]
