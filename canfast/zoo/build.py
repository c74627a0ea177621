"""The built-in models' architectures and processors: real Hugging Face LLaVA and InstructBLIP
classes, only small. Training (:mod:`canfast.zoo.train`) fills in the weights.

Sizes are chosen so that a CPU trains each model to near-perfect held-out accuracy in minutes,
while the feed-forward blocks stay wide enough (4x the hidden size) to hold many neurons of which
only a few matter most, as in the large models the CAN method was made for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from canfast.zoo.scenes import IMAGE_SIZE
from canfast.zoo.tokenizer import IMAGE_TOKEN, language_tokenizer, qformer_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, ProcessorMixin

PATCH_SIZE = 8
NUM_QUERY_TOKENS = 8
SEED = 0

LLAVA = "tiny-llava"
INSTRUCTBLIP = "tiny-instructblip"
MODEL_NAMES = (LLAVA, INSTRUCTBLIP)


def _image_size() -> dict:
    return {
        "size": {"shortest_edge": IMAGE_SIZE},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }


def llava_processor() -> ProcessorMixin:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**_image_size()),
        tokenizer=language_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        # The CLIP tower puts a CLS token before the patches; "default" drops it again.
        num_additional_image_tokens=1,
    )


def instructblip_processor() -> ProcessorMixin:
    from transformers import InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=language_tokenizer(image_token_attribute=False),
        qformer_tokenizer=qformer_tokenizer(),
        num_query_tokens=NUM_QUERY_TOKENS,
    )


def _llama_config(tokenizer, **sizes):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.get("hidden_size", 128),
        intermediate_size=sizes.get("intermediate_size", 512),
        num_hidden_layers=sizes.get("num_hidden_layers", 3),
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def llava_model(processor: ProcessorMixin) -> PreTrainedModel:
    """An untrained LLaVA: CLIP tower (3 layers, the last unused as in LLaVA-1.5, whose features
    come from the second-to-last layer), two-layer projector, 3-layer Llama."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=96,
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=96,
        ),
        text_config=_llama_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config)
    _set_generation_config(model, tokenizer)
    return model.eval()


def instructblip_model(processor: ProcessorMixin) -> PreTrainedModel:
    """An untrained InstructBLIP: ViT (2 layers), Q-Former (2 layers, cross-attention in each,
    8 queries), 3-layer Llama."""
    import torch
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    tokenizer = processor.tokenizer
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=96,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            initializer_range=0.02,
        ),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(processor.qformer_tokenizer),
            hidden_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=384,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=64,
            pad_token_id=processor.qformer_tokenizer.pad_token_id,
            cross_attention_frequency=1,
            encoder_hidden_size=96,
        ),
        text_config=_llama_config(tokenizer),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    torch.manual_seed(SEED)
    model = InstructBlipForConditionalGeneration(config)
    # Hugging Face starts the queries at zero, which keeps them identical forever: every query
    # would get the same gradient. Random queries can specialise.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.5)
    _set_generation_config(model, tokenizer)
    return model.eval()


def _set_generation_config(model: PreTrainedModel, tokenizer) -> None:
    """Greedy decoding that stops at ``</s>``: what canfast and ``generate()`` do by default."""
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.do_sample = False
    generation.max_new_tokens = 24


def build(name: str) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The untrained model ``name`` (from the fixed seed) and its processor."""
    if name == LLAVA:
        processor = llava_processor()
        return llava_model(processor), processor
    if name == INSTRUCTBLIP:
        processor = instructblip_processor()
        return instructblip_model(processor), processor
    raise ValueError(f"unknown built-in model {name!r}; valid: {', '.join(MODEL_NAMES)}")
