"""Tiny models of every family canfast supports, built from configs with random weights.

No downloads: the tokenizers are word-level over a small fixed vocabulary, the image processors
are the PIL ones, and every model is a few layers of a few channels. Weights are drawn with a
large standard deviation so that masking a neuron or following a gradient changes numbers well
above rounding noise.

Use :func:`build` (cached per family and seed; callers get a deep copy) or :func:`wrap` for a
``canfast.Model``, and :func:`samples` for data that fits a family.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
from PIL import Image

from canfast.adapters.processors import without_video

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
NUM_QUERY_TOKENS = 4
HIDDEN = 16
FFN = 32
LAYERS = 2
WEIGHT_STD = 0.2

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "[MASK]", "[CLS]", "[SEP]", "[PAD]"]
WORDS = (
    "USER ASSISTANT : ? . , a an the is what color shape of it in on left right top bottom "
    "red green blue yellow black white square circle triangle triangles star big small one two "
    "three there and or yes no picture image shows describe"
).split()

# Families: the name used in test ids, and whether the model reads an image.
VLM_FAMILIES = ("llava", "instructblip")
TEXT_FAMILIES = ("llama", "qwen2", "gpt2", "opt", "gpt_neox", "bert", "t5")
FAMILIES = VLM_FAMILIES + TEXT_FAMILIES
CAUSAL_FAMILIES = ("llava", "instructblip", "llama", "qwen2", "gpt2", "opt", "gpt_neox")


# ----- tokenizers ----------------------------------------------------------------------------


def tokenizer(style: str = "llama", image_token: bool = False, named: dict | None = None):
    """A word-level fast tokenizer.

    ``named`` maps attribute names to special tokens (``{"boi_token": "<start_of_image>"}``):
    the tokenizer answers ``tok.boi_token`` and ``tok.boi_token_id``, and saves them, as real
    checkpoints' tokenizers of multimodal models do.

    ``style``: ``llama`` (``<s>`` first, ``</s>`` ends answers), ``gpt2`` (no BOS), ``bert``
    (``[CLS] A [SEP]``, a ``[MASK]`` token, token type ids) or ``t5`` (``A </s>``).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    names = ["input_ids", "attention_mask"]
    kwargs: dict = {}
    if style == "llama":
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    elif style == "bert":
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        names = ["input_ids", "token_type_ids", "attention_mask"]
        # Its own pad token, so that padding with another tokenizer's id shows.
        kwargs = {"mask_token": "[MASK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
        kwargs["pad_token"] = "[PAD]"
    elif style == "t5":
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
    elif style != "gpt2":
        raise ValueError(style)
    kwargs.setdefault("pad_token", "<pad>")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_input_names=names,
        model_max_length=512,
        extra_special_tokens=({"image_token": IMAGE_TOKEN} if image_token else {}) | (named or {})
        or None,
        **kwargs,
    )
    if style in ("llama", "gpt2"):
        tok.add_tokens(
            [AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True
        )
    return tok


# ----- weights -------------------------------------------------------------------------------


@torch.no_grad()
def roughen(model: torch.nn.Module, seed: int, std: float = WEIGHT_STD) -> torch.nn.Module:
    """Redraw every matrix with ``std`` and every bias with ``std / 2``; norms keep their ones.

    Matrices include embeddings and InstructBLIP's query tokens (which start at zero, and
    identical queries would make gradients degenerate).
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2 or name.endswith("query_tokens"):
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        elif name.endswith("bias") and "norm" not in name.lower():
            param.copy_(torch.randn(param.shape, generator=generator) * std / 2)
    return model


# ----- models --------------------------------------------------------------------------------


def _llama_config(tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _llava():
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tokenizer("llama", image_token=True)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        ),
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            # Three layers with features from the second-to-last, as LLaVA-1.5: the last vision
            # layer runs but the loss does not depend on it.
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=HIDDEN,
        ),
        text_config=_llama_config(tok),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=NUM_PATCHES,
        projector_hidden_act="gelu",
    )
    return LlavaForConditionalGeneration(config), processor


def _instructblip():
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = tokenizer("llama")
    qtok = tokenizer("bert")
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok,
        qformer_tokenizer=qtok,
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
        ),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qtok),
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=FFN,
            max_position_embeddings=64,
            pad_token_id=qtok.pad_token_id,
            cross_attention_frequency=1,
            encoder_hidden_size=HIDDEN,
        ),
        text_config=_llama_config(tok),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    config.image_token_id = config.image_token_index
    return InstructBlipForConditionalGeneration(config), processor


def _llama():
    from transformers import LlamaForCausalLM

    tok = tokenizer("llama")
    return LlamaForCausalLM(_llama_config(tok)), tok


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tokenizer("llama")
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config), tok


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer("gpt2")
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=HIDDEN,
        n_inner=FFN,
        n_layer=LAYERS,
        n_head=2,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2LMHeadModel(config), tok


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    tok = tokenizer("llama")
    config = OPTConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        ffn_dim=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return OPTForCausalLM(config), tok


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = tokenizer("gpt2")
    config = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config), tok


def _bert():
    from transformers import BertConfig, BertForMaskedLM

    tok = tokenizer("bert")
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tok.pad_token_id,
    )
    return BertForMaskedLM(config), tok


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    tok = tokenizer("t5")
    config = T5Config(
        vocab_size=len(tok),
        d_model=HIDDEN,
        d_kv=8,
        d_ff=FFN,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=2,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return T5ForConditionalGeneration(config), tok


BUILDERS = {
    "llava": _llava,
    "instructblip": _instructblip,
    "llama": _llama,
    "qwen2": _qwen2,
    "gpt2": _gpt2,
    "opt": _opt,
    "gpt_neox": _gpt_neox,
    "bert": _bert,
    "t5": _t5,
}


@functools.cache
def _built(family: str, seed: int):
    torch.manual_seed(seed)
    model, processor = BUILDERS[family]()
    roughen(model, seed)
    model.eval()
    generation = getattr(model, "generation_config", None)
    tok = getattr(processor, "tokenizer", processor)
    if generation is not None:
        generation.pad_token_id = tok.pad_token_id
        generation.eos_token_id = tok.eos_token_id
        generation.do_sample = False
    return model, processor


def build(family: str, seed: int = 0):
    """A fresh ``(hf_model, processor)`` of ``family``: a deep copy of the cached build."""
    model, processor = _built(family, seed)
    return copy.deepcopy(model), processor


def wrap(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``canfast.Model`` of ``family`` in ``dtype``."""
    from canfast import Model

    model, processor = build(family, seed)
    return Model(model.to(dtype), processor, name=f"tiny-{family}")


def fit(model, samples, steps: int = 40, lr: float = 3e-3):
    """Train ``model`` (a ``canfast.Model``) in place to memorise ``samples``' targets, so that
    its perplexity starts near 1 and masking the right neurons can make it collapse. Leaves no
    gradients behind."""
    from canfast.objective import mean_nll

    batch = model.encode(samples)
    optimizer = torch.optim.Adam(model.hf.parameters(), lr=lr)
    for _ in range(steps):
        loss = mean_nll(model.forward(batch), batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.hf.zero_grad(set_to_none=True)
    return model


# ----- data ----------------------------------------------------------------------------------


def image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3))
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


# Prompts and targets of different lengths, so that batches need padding.
TEXT = [
    ("what color is the square ?", "red"),
    ("what shape is it ?", "a big blue circle on the left"),
    ("describe the picture", "two small green triangles"),
    ("is there a star in the image ?", "no"),
]
MASKED = [
    ("the square is [MASK] .", "red"),
    ("a [MASK] circle on the [MASK] .", "big left"),
    ("two small [MASK] triangles in the [MASK] of the picture", "green top"),
]


def samples(family: str, n: int = 3):
    """``n`` samples with targets that suit ``family``."""
    from canfast import Sample

    if family == "bert":
        rows = MASKED
    else:
        rows = TEXT
    rows = [rows[i % len(rows)] for i in range(n)]
    with_image = family in VLM_FAMILIES
    return [
        Sample(image(i) if with_image else None, prompt, target)
        for i, (prompt, target) in enumerate(rows)
    ]


# ----- families of issue 11: current language models and mixtures of experts -----------------

NEW_TEXT_FAMILIES = ("gemma2", "gemma3_text", "phi3", "qwen3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
EXPERTS = 4


def _text_config(config_class, tok, **extra):
    common = dict(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    common.update(extra)
    return config_class(**common)


def _causal(config_name: str, model_name: str, **extra):
    import transformers

    tok = tokenizer("llama")
    config = _text_config(getattr(transformers, config_name), tok, **extra)
    return getattr(transformers, model_name)(config), tok


def _moe_extra(**extra):
    return dict(num_experts_per_tok=2, **extra)


BUILDERS.update(
    {
        "gemma2": lambda: _causal("Gemma2Config", "Gemma2ForCausalLM"),
        "gemma3_text": lambda: _causal(
            "Gemma3TextConfig", "Gemma3ForCausalLM", sliding_window=4, layer_types=None
        ),
        "phi3": lambda: _causal("Phi3Config", "Phi3ForCausalLM"),
        "qwen3": lambda: _causal("Qwen3Config", "Qwen3ForCausalLM"),
        "mixtral": lambda: _causal(
            "MixtralConfig", "MixtralForCausalLM", **_moe_extra(num_local_experts=EXPERTS)
        ),
        "qwen2_moe": lambda: _causal(
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            **_moe_extra(
                num_experts=EXPERTS,
                moe_intermediate_size=FFN // 2,
                shared_expert_intermediate_size=FFN,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            ),
        ),
        "qwen3_moe": lambda: _causal(
            "Qwen3MoeConfig",
            "Qwen3MoeForCausalLM",
            **_moe_extra(num_experts=EXPERTS, moe_intermediate_size=FFN // 2, mlp_only_layers=[]),
        ),
        "olmoe": lambda: _causal(
            "OlmoeConfig", "OlmoeForCausalLM", **_moe_extra(num_experts=EXPERTS)
        ),
    }
)


# ----- families of issue 11: current vision-language models ----------------------------------

NEW_VLM_FAMILIES = (
    "blip-2",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "paligemma",
    "gemma3",
    "idefics3",
    "smolvlm",
    "mllama",
    "internvl",
    "mistral3",
)


def _tokenizer_with(
    *specials: str, image_token: str | None = None, style: str = "llama", named: dict | None = None
):
    """The word-level tokenizer plus special tokens; ``image_token`` also names the tokenizer's
    ``image_token`` (processors look for it), and ``named`` names others (see :func:`tokenizer`).
    """
    from tokenizers import AddedToken

    tok = tokenizer(style, named=named)
    tok.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True
    )
    if image_token is not None:
        tok.image_token = image_token
        tok.image_token_id = tok.convert_tokens_to_ids(image_token)
    return tok


def _vision(config_class, **extra):
    kwargs = dict(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    kwargs.update(extra)
    return config_class(**kwargs)


def _text(config_class, tok, **extra):
    return _text_config(config_class, tok, **extra)


def _blip2():
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = tokenizer("llama")
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok,
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    text = OPTConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        ffn_dim=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = Blip2Config(
        vision_config=_vision(Blip2VisionConfig),
        qformer_config=Blip2QFormerConfig(
            vocab_size=len(tok),
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=FFN,
            cross_attention_frequency=1,
            encoder_hidden_size=HIDDEN,
        ),
        text_config=text,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    return Blip2ForConditionalGeneration(config), processor


# The anyres grid of the tiny LLaVA-NeXT and OneVision; tests of mixed tile counts widen it.
LLAVA_GRID = [[IMAGE_SIZE, IMAGE_SIZE]]


def _llava_next():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tok = _tokenizer_with(IMAGE_TOKEN, image_token=IMAGE_TOKEN)
    grid = LLAVA_GRID
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_grid_pinpoints=grid,
        ),
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    config = LlavaNextConfig(
        vision_config=_vision(CLIPVisionConfig, projection_dim=HIDDEN),
        text_config=_text(LlamaConfig, tok),
        image_token_index=tok.image_token_id,
        image_grid_pinpoints=grid,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaNextForConditionalGeneration(config), processor


def _llava_onevision():
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = _tokenizer_with(IMAGE_TOKEN, "<video>", "<|im_start|>", "<|im_end|>")
    grid = LLAVA_GRID
    processor = without_video(LlavaOnevisionProcessor)(
        image_processor=LlavaOnevisionImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=grid
        ),
        tokenizer=tok,
        num_image_tokens=NUM_PATCHES,
        vision_feature_select_strategy="full",
    )
    config = LlavaOnevisionConfig(
        vision_config=_vision(SiglipVisionConfig, vision_use_head=False),
        text_config=_text(Qwen2Config, tok),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=grid,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


QWEN_SPECIALS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def _qwen_vl(version: str):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    prefix = {"2": "Qwen2VL", "2.5": "Qwen2_5_VL", "3": "Qwen3VL"}[version]
    tok = _tokenizer_with(*QWEN_SPECIALS)
    patch = 4 if version != "3" else PATCH_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE},
    )
    processor = without_video(getattr(transformers, f"{prefix}Processor"))(
        image_processor=image_processor, tokenizer=tok
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]},
    )
    if version == "3":
        text["head_dim"] = 8
        text["rope_parameters"] = {
            "rope_type": "default",
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        }
        vision = dict(
            depth=LAYERS,
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_heads=2,
            out_hidden_size=HIDDEN,
            patch_size=patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        )
    elif version == "2.5":
        vision = dict(
            depth=LAYERS,
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_heads=2,
            out_hidden_size=HIDDEN,
            patch_size=patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=IMAGE_SIZE,
            fullatt_block_indexes=[LAYERS - 1],
        )
    else:
        vision = dict(
            depth=LAYERS,
            embed_dim=HIDDEN,
            hidden_size=HIDDEN,
            mlp_ratio=FFN // HIDDEN,
            num_heads=2,
            patch_size=patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(config), processor


def _paligemma():
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = _tokenizer_with(IMAGE_TOKEN, image_token=IMAGE_TOKEN)
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = NUM_PATCHES
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    config = PaliGemmaConfig(
        vision_config=_vision(SiglipVisionConfig, projection_dim=HIDDEN, vision_use_head=False),
        text_config=_text(GemmaConfig, tok),
        image_token_index=tok.image_token_id,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    return PaliGemmaForConditionalGeneration(config), processor


def _gemma3():
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    specials = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
    named = dict(zip(("boi_token", "eoi_token", "image_token"), specials, strict=True))
    tok = _tokenizer_with(*specials, "<start_of_turn>", "<end_of_turn>", named=named)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok,
        image_seq_length=4,
    )
    config = Gemma3Config(
        vision_config=_vision(SiglipVisionConfig, vision_use_head=False),
        # One layer of global attention: through sliding windows alone the targets, far along
        # the prompt, would never see the image.
        text_config=_text(
            Gemma3TextConfig,
            tok,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        mm_tokens_per_image=4,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    return Gemma3ForConditionalGeneration(config), processor


def _idefics3(smol: bool):
    import transformers
    from transformers import LlamaConfig

    prefix = "SmolVLM" if smol else "Idefics3"
    module = "smolvlm" if smol else "idefics3"
    pil = __import__(
        f"transformers.models.{module}.image_processing_pil_{module}",
        fromlist=[f"{prefix}ImageProcessorPil"],
    )
    specials = ("<fake_token_around_image>", IMAGE_TOKEN, "<end_of_utterance>", "<global-img>")
    tok = _tokenizer_with(*specials)
    scale = 2
    image_seq_len = NUM_PATCHES // scale**2
    # SmolVLM's processor takes a video processor (None here) where Idefics3's takes none.
    video = {"video_processor": None} if smol else {}
    processor = without_video(getattr(transformers, f"{prefix}Processor"))(
        **video,
        image_processor=getattr(pil, f"{prefix}ImageProcessorPil")(
            do_image_splitting=False,
            size={"longest_edge": IMAGE_SIZE},
            max_image_size={"longest_edge": IMAGE_SIZE},
        ),
        tokenizer=tok,
        image_seq_len=image_seq_len,
    )
    vision_config = getattr(transformers, f"{prefix}VisionConfig")
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=_vision(vision_config),
        text_config=_text(LlamaConfig, tok),
        scale_factor=scale,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tok.pad_token_id,
    )
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(config), processor


def _mllama():
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = _tokenizer_with("<|image|>", "<|python_tag|>")
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=1
        ),
        tokenizer=tok,
    )
    vision = MllamaVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_global_layers=1,
        attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        max_num_tiles=1,
        vision_output_dim=HIDDEN * 2,
        intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1]],
    )
    text = MllamaTextConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS + 1,
        num_attention_heads=2,
        num_key_value_heads=1,
        cross_attention_layers=[1],
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = MllamaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    model = MllamaForConditionalGeneration(config)
    # Mllama's cross-attention gates start at zero (tanh(0) = 0): the image, the vision tower and
    # the cross-attention layer's FFN would never reach the loss.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)
    return model, processor


def _internvl():
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    specials = ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    names = ("start_image_token", "end_image_token", "context_image_token", "video_token")
    named = dict(zip(names, specials, strict=True))
    tok = _tokenizer_with(*specials, "<|im_start|>", "<|im_end|>", named=named)
    scale = 0.5
    image_seq = int(NUM_PATCHES * scale**2)
    processor = without_video(InternVLProcessor)(
        image_processor=GotOcr2ImageProcessorPil(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=False
        ),
        tokenizer=tok,
        image_seq_length=image_seq,
    )
    config = InternVLConfig(
        vision_config=_vision(
            InternVLVisionConfig,
            image_size=[IMAGE_SIZE, IMAGE_SIZE],
            patch_size=[PATCH_SIZE, PATCH_SIZE],
        ),
        text_config=_text(Qwen2Config, tok),
        image_token_id=tok.context_image_token_id,
        downsample_ratio=scale,
        vision_feature_layer=-1,
    )
    return InternVLForConditionalGeneration(config), processor


def _mistral3():
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from canfast.adapters.processors import PixtralProcessorPil

    specials = ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]")
    tok = _tokenizer_with(*specials)
    processor = PixtralProcessorPil(
        image_processor=PixtralImageProcessorPil(size={"longest_edge": IMAGE_SIZE}),
        tokenizer=tok,
        patch_size=PATCH_SIZE,
        spatial_merge_size=2,
    )
    vision = PixtralVisionConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        head_dim=8,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = Mistral3Config(
        vision_config=vision,
        text_config=_text(MistralConfig, tok),
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(config), processor


BUILDERS.update(
    {
        "blip-2": _blip2,
        "llava_next": _llava_next,
        "llava_onevision": _llava_onevision,
        "qwen2_vl": lambda: _qwen_vl("2"),
        "qwen2_5_vl": lambda: _qwen_vl("2.5"),
        "qwen3_vl": lambda: _qwen_vl("3"),
        "paligemma": _paligemma,
        "gemma3": _gemma3,
        "idefics3": lambda: _idefics3(False),
        "smolvlm": lambda: _idefics3(True),
        "mllama": _mllama,
        "internvl": _internvl,
        "mistral3": _mistral3,
    }
)
VLM_FAMILIES = VLM_FAMILIES + NEW_VLM_FAMILIES


def _gptj():
    """GPT-J: a family canfast has no rule for (FFN ``mlp.fc_in`` / ``mlp.fc_out``)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    tok = tokenizer("llama")
    config = GPTJConfig(
        vocab_size=len(tok),
        n_embd=HIDDEN,
        n_inner=FFN,
        n_layer=LAYERS,
        n_head=2,
        rotary_dim=4,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    return GPTJForCausalLM(config), tok


BUILDERS["gptj"] = _gptj
