"""Model: a transformers model, its processor or tokenizer, its FFN sites and fingerprint.

``Model.encode`` is the single place where samples become model inputs: every loss, score and
perplexity in canfast goes through it. The work is its family's encoder's
(:mod:`canfast.adapters.encoders`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from canfast.adapters import Adapter, adapter_for, find_sites
from canfast.adapters.chat import has_chat_template
from canfast.adapters.encoders import IGNORE, Batch, Encoder

__all__ = ["IGNORE", "Batch", "Model", "load", "quiet_transformers"]
from canfast.data import Sample
from canfast.errors import BadInput
from canfast.sites import UNITS, Site, select


class Model:
    """A transformers model wrapped for canfast.

    Build one with :func:`load`, or wrap objects already in memory with
    ``Model(hf_model, processor)``; ``processor`` is a processor for vision-language models and a
    tokenizer for text models.
    """

    def __init__(
        self,
        hf_model: nn.Module,
        processor,
        name: str | None = None,
        prompt_template: str | None = None,
        target_separator: str | None = None,
        score_eos: bool = True,
        ffn_map: dict | str | Path | None = None,
        chat_template: bool = True,
    ) -> None:
        self.hf = hf_model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.name = name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        self.adapter: Adapter = adapter_for(hf_model.config.model_type, ffn_map)
        if prompt_template is not None and "{prompt}" not in prompt_template:
            raise BadInput(f"prompt template {prompt_template!r} has no {{prompt}} in it")
        self.task = self.adapter.task
        text_config = getattr(hf_model.config, "text_config", hf_model.config)
        if getattr(text_config, "is_encoder_decoder", False) or hf_model.config.is_encoder_decoder:
            self.task = "seq2seq"
        self._sites: dict[str, list[Site]] = {}
        if self.tokenizer is not None and self.tokenizer.pad_token_id is None:
            # Padding positions are always masked out, so any id will do as long as one exists.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.encoder: Encoder = self.adapter.encoder(
            processor, self.task, prompt_template, target_separator, name=self.name
        )
        self.encoder.score_eos = score_eos
        # The model's own chat template, unless a template is given or it is turned off.
        self.encoder.chat = (
            chat_template and prompt_template is None and has_chat_template(processor)
        )
        if not self.all_sites("out"):
            raise BadInput(
                f"unsupported architecture {hf_model.config.model_type!r}: "
                "no feed-forward sites found"
            )

    # ----- sites -----------------------------------------------------------------------------

    def all_sites(self, unit: str = "out") -> list[Site]:
        if unit not in UNITS:
            raise BadInput(f"unknown unit {unit!r}; choose 'out' or 'mid'")
        if unit not in self._sites:
            self._sites[unit] = find_sites(self.hf, self.adapter, unit)
        return self._sites[unit]

    def sites(
        self,
        unit: str = "out",
        sites: Sequence[str] | str | None = None,
        components: Sequence[str] | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[Site]:
        """The sites of ``unit`` chosen by glob patterns, components and kinds (all optional)."""
        every = self.all_sites(unit)
        if not sites and not components and not kinds:
            return list(every)
        return select(every, sites, components, kinds)

    def site(self, name: str) -> Site:
        unit = "mid" if name.endswith(".mid") else "out"
        for site in self.all_sites(unit):
            if site.name == name:
                return site
        raise BadInput(f"no site named {name!r} in {self.name}")

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def fingerprint(self) -> str:
        """A short digest of the architecture and of the weights of every site.

        Score files carry it, so scores computed on another model are refused. Hashing a few
        rows of each site's weight tells checkpoints of one architecture apart cheaply.
        """
        digest = hashlib.sha256()
        config = self.hf.config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            config.pop(volatile, None)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for site in self.all_sites("out"):
            weight = site.module.weight.detach()
            digest.update(f"{site.name}:{tuple(weight.shape)}".encode())
            digest.update(weight.reshape(-1)[:64].float().cpu().numpy().tobytes())
            digest.update(weight.reshape(-1)[-64:].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    # ----- inputs ----------------------------------------------------------------------------

    @property
    def score_eos(self) -> bool:
        """Whether every target gets EOS appended and scored (the default)."""
        return self.encoder.score_eos

    @score_eos.setter
    def score_eos(self, value: bool) -> None:
        self.encoder.score_eos = value

    @property
    def chat_template(self) -> bool:
        """Whether prompts go through the model's own chat template."""
        return self.encoder.chat

    def encode(self, samples: Sequence[Sample]) -> Batch:
        """Inputs, aligned labels and target mask for samples that all have targets: the
        family's encoder (:mod:`canfast.adapters.encoders`) at work."""
        return self.encoder.encode(samples)

    def encode_prompts(self, samples: Sequence[Sample]) -> dict[str, Tensor]:
        """Prompt inputs for generation, padded as the model generates from them."""
        return self.encoder.encode_prompts(samples)

    def forward(self, batch: Batch):
        inputs = dict(batch.inputs)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return self.hf(**inputs, use_cache=False)

    def __repr__(self) -> str:
        n = sum(s.channels for s in self.all_sites("out"))
        return f"Model({self.name!r}, family={self.adapter.family}, {n} FFN neurons)"


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16}
    names |= {"bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise BadInput(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    return names[dtype]


def load(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    ffn_map: dict | str | Path | None = None,
    prompt_template: str | None = None,
    chat_template: bool = True,
) -> Model:
    """Load a model and its processor (or tokenizer) by Hub id, local path or ``builtin:NAME``.

    Works offline for local paths and for cached models with ``HF_HUB_OFFLINE=1``. Remote code is
    never trusted unless ``trust_remote_code=True``. ``ffn_map`` describes the FFN blocks of a
    family canfast has no rule for (:mod:`canfast.adapters.user_map`). A ``config.json`` file
    gives the model's architecture alone, on the meta device: no weights, no processor; enough
    for its site map (``canfast sites --model CONFIG.json``), not to run it. Prompts go through
    the model's chat template when it has one, unless ``chat_template=False`` or a
    ``prompt_template`` (with ``{prompt}``) is given.
    """
    dtype = _torch_dtype(dtype)
    if name_or_path.endswith(".json") and Path(name_or_path).expanduser().is_file():
        hf_model = architecture_from_config(name_or_path, ffn_map)
        return Model(hf_model, None, name=name_or_path, ffn_map=ffn_map)
    if name_or_path.startswith("builtin:"):
        from canfast.zoo import load_builtin_model

        hf_model, processor = load_builtin_model(name_or_path.removeprefix("builtin:"), dtype)
    else:
        hf_model, processor = _load_pretrained(
            name_or_path, dtype, device_map, trust_remote_code, ffn_map
        )
    if device is not None and device_map is None:
        hf_model.to(device)
    hf_model.eval()
    return Model(
        hf_model,
        processor,
        name=name_or_path,
        prompt_template=prompt_template,
        ffn_map=ffn_map,
        chat_template=chat_template,
    )


def _auto_model_class(adapter: Adapter, config):
    import transformers

    if adapter.uses_images:
        return transformers.AutoModelForImageTextToText
    task = "seq2seq" if getattr(config, "is_encoder_decoder", False) else adapter.task
    return {
        "causal": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
        "masked": transformers.AutoModelForMaskedLM,
    }[task]


def architecture_from_config(path: str | Path, ffn_map=None) -> nn.Module:
    """The model a ``config.json`` describes, built on the meta device: shapes, no weights."""
    from transformers import AutoConfig

    path = Path(path).expanduser()
    try:
        fields = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"config {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(fields, dict) or not isinstance(fields.get("model_type"), str):
        raise BadInput(f"config {path}: no 'model_type' field")
    model_type = fields.pop("model_type")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise BadInput(f"config {path}: model_type {model_type!r} is unknown to transformers")
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"config {path}: {first}") from None
    auto_model = _auto_model_class(adapter_for(model_type, ffn_map), config)
    with torch.device("meta"):
        return auto_model.from_config(config)


def _load_pretrained(name: str, dtype, device_map, trust_remote_code: bool, ffn_map=None):
    import transformers
    from transformers import AutoConfig

    local = Path(name).expanduser()
    if name.startswith((".", "/", "~")) and not local.exists():
        raise BadInput(f"model not found: {name} (no such directory)")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"cannot load model {name!r}: {first}") from None
    adapter = adapter_for(config.model_type, ffn_map)
    auto_model = _auto_model_class(adapter, config)
    auto_processor = (
        transformers.AutoProcessor if adapter.uses_images else transformers.AutoTokenizer
    )
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    hf_model = auto_model.from_pretrained(name, **kwargs)
    processor = auto_processor.from_pretrained(name, trust_remote_code=trust_remote_code)
    return hf_model, processor


def quiet_transformers() -> None:
    """Keep transformers' advisory warnings off the terminal of a command-line run."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
