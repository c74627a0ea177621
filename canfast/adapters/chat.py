"""Prompts through the model's own chat template.

A checkpoint that ships a chat template (on its processor or its tokenizer) was tuned on
prompts written that way; canfast renders each sample's prompt as one user turn, with an image
placeholder when the sample has an image, followed by the template's opening of the assistant's
turn (``add_generation_prompt``). The answer is appended after it by the encoder, so the target
mask covers the answer alone, whatever the template writes around the turns.
"""

from __future__ import annotations

from typing import Any


def _owner(processor: Any) -> Any | None:
    """The object whose chat template applies: the processor's own, else its tokenizer's."""
    if processor is None:
        return None
    if getattr(processor, "chat_template", None):
        return processor
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer if getattr(tokenizer, "chat_template", None) else None


def has_chat_template(processor: Any) -> bool:
    return _owner(processor) is not None


def chat_prompt(processor: Any, prompt: str, image: bool) -> str:
    """``prompt`` as the template's user turn (with an image first when ``image``), ending where
    the assistant's answer begins.

    A template that writes the BOS token itself would get a second one from the tokenizer, so a
    leading BOS is left to the tokenizer when it adds one.
    """
    owner = _owner(processor)
    if owner is None:
        raise ValueError("no chat template")
    tokenizer = getattr(processor, "tokenizer", processor)
    if owner is tokenizer:
        # Tokenizer templates take plain-text content.
        content: Any = prompt
    else:
        content = [{"type": "text", "text": prompt}]
        if image:
            content.insert(0, {"type": "image"})
    messages = [{"role": "user", "content": content}]
    text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        added = tokenizer("", add_special_tokens=True)["input_ids"]
        if tokenizer.bos_token_id in added:
            text = text[len(bos) :]
    return text
