"""Current vision-language families: a vision tower, a projector and a language model.

They differ in module layout (found by the FFN patterns of :mod:`canfast.adapters.base`), in
which Linears form their projector, and in the image placeholder of their prompt. Each prompt
template here is the hand-written one of the family's common instruction-tuned checkpoint; a
model's own chat template replaces it where the model has one.
"""

from __future__ import annotations

from canfast.adapters.base import Adapter, component_by_keyword


def _language_stream(path: str) -> str | None:
    return "language" if component_by_keyword(path) == "language" else None


def _seq2seq_stream(path: str) -> str | None:
    # BLIP-2 with Flan-T5: the decoder runs over the target tokens, the encoder over the prompt.
    # OPT's layers also sit under a "decoder", but it is a decoder-only model.
    if component_by_keyword(path) != "language":
        return None
    return "decoder" if ".decoder.block." in f".{path}." else "language"


def _vlm(family: str, model_types: tuple[str, ...], template: str, **extra) -> Adapter:
    extra.setdefault("components", ("vision", "projector", "language"))
    extra.setdefault("stream_of", _language_stream)
    return Adapter(
        family=family,
        model_types=model_types,
        task="causal",
        component_of=component_by_keyword,
        prompt_template=template,
        uses_images=True,
        **extra,
    )


BLIP2 = _vlm(
    "blip-2",
    ("blip-2",),
    "Question: {prompt} Answer:",
    extra_single_sites=(("language_projection", "down"),),
    stream_of=_seq2seq_stream,
    components=("vision", "qformer", "projector", "language"),
    notes="OPT or Flan-T5 language model; the projector is one Linear",
)
LLAVA_NEXT = _vlm(
    "llava-next",
    ("llava_next",),
    "[INST] <image>\n{prompt} [/INST]",
    notes="image tiles run through the vision tower as extra rows",
)
LLAVA_ONEVISION = _vlm(
    "llava-onevision",
    ("llava_onevision",),
    "<|im_start|>user <image>\n{prompt}<|im_end|><|im_start|>assistant\n",
    notes="SigLIP tower, image tiles as extra rows",
)
QWEN_VL = _vlm(
    "qwen-vl",
    ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n",
    notes="patch merger(s) as projector; Qwen3-VL's deepstack mergers are projector layers",
)
PALIGEMMA = _vlm(
    "paligemma",
    ("paligemma",),
    "{prompt}",
    extra_single_sites=(("model.multi_modal_projector.linear", "down"),),
    target_token_type=1,  # its token type ids mark the suffix (the answer) with 1
    notes="the processor writes the image tokens, BOS and the newline; the projector is one Linear",
)
GEMMA3 = _vlm(
    "gemma3",
    ("gemma3",),
    "<start_of_turn>user\n<start_of_image>{prompt}<end_of_turn>\n<start_of_turn>model\n",
    components=("vision", "language"),
    notes="the projector is a bare matrix, not a Linear: no projector sites",
)
IDEFICS3 = _vlm(
    "idefics3",
    ("idefics3", "smolvlm"),
    "User:<image>{prompt}<end_of_utterance>\nAssistant:",
    extra_single_sites=(("model.connector.modality_projection.proj", "down"),),
    notes="Idefics3 and SmolVLM; the connector is one Linear",
)
MLLAMA = _vlm(
    "mllama",
    ("mllama",),
    "<|image|>{prompt}",
    extra_single_sites=(("model.multi_modal_projector", "down"),),
    notes="local and global vision transformers numbered in turn; cross-attention layers' FFNs "
    "are language layers",
)
INTERNVL = _vlm(
    "internvl",
    ("internvl",),
    "<|im_start|>user\n<IMG_CONTEXT>\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    notes="InternViT tower; the pixel-shuffle projector's two Linears",
)
MISTRAL3 = _vlm(
    "mistral3",
    ("mistral3",),
    "[INST][IMG]{prompt}[/INST]",
    notes="Pixtral vision tower (gated FFN); the patch merger's single Linear is not a site",
)

ADAPTERS = (
    BLIP2,
    LLAVA_NEXT,
    LLAVA_ONEVISION,
    QWEN_VL,
    PALIGEMMA,
    GEMMA3,
    IDEFICS3,
    MLLAMA,
    INTERNVL,
    MISTRAL3,
)
