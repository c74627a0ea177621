"""Word-level tokenizers for the built-in models, built from the scene vocabulary.

One token per word or punctuation mark, so that decoding the ids of an answer gives back the
answer exactly (tokens joined by single spaces). Nothing is downloaded: the vocabulary is the
synthetic language of :mod:`canfast.zoo.scenes` plus the words of the LLaVA prompt template.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from canfast.zoo.scenes import vocabulary

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
# "USER: <image>\n{prompt} ASSISTANT:" splits into these words around the image tokens.
TEMPLATE_WORDS = ("USER", ":", "ASSISTANT")


def _word_tokenizer(specials: list[str], words: list[str], unk: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate([*specials, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    # Splits on whitespace and between words and punctuation, so "USER:" is "USER" ":".
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # Joins tokens with single spaces: the decoded answer is the target string itself.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tokenizer


def language_tokenizer(image_token_attribute: bool = True) -> PreTrainedTokenizerFast:
    """The language model's tokenizer: ``<s>`` before every text, ``</s>`` ends an answer,
    ``<image>`` a special added token, left padding for batched generation.

    ``image_token_attribute`` also names ``<image>`` as ``tokenizer.image_token``, which
    ``LlavaProcessor`` reads. ``InstructBlipProcessor`` must not see that attribute: it expects
    an ``AddedToken`` there, but the attribute is a string.
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    backend = _word_tokenizer(specials, [*TEMPLATE_WORDS, *vocabulary()], unk="<unk>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": IMAGE_TOKEN} if image_token_attribute else None,
        model_max_length=512,
    )
    # Special and not normalized, so that "<image><image>..." splits into one id per copy.
    tokenizer.add_tokens(
        [AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True
    )
    return tokenizer


def qformer_tokenizer() -> PreTrainedTokenizerFast:
    """The Q-Former's tokenizer, BERT-like: ``[CLS] prompt [SEP]``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    backend = _word_tokenizer(specials, vocabulary(), unk="[UNK]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
