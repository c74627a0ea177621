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
    ) -> None:
        self.hf = hf_model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.name = name or getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        self.adapter: Adapter = adapter_for(hf_model.config.model_type)
        self.task = self.adapter.task
        text_config = getattr(hf_model.config, "text_config", hf_model.config)
        if getattr(text_config, "is_encoder_decoder", False) or hf_model.config.is_encoder_decoder:
            self.task = "seq2seq"
        self._sites: dict[str, list[Site]] = {}
        if self.tokenizer.pad_token_id is None:
            # Padding positions are always masked out, so any id will do as long as one exists.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.encoder: Encoder = self.adapter.encoder(
            processor, self.task, prompt_template, target_separator, name=self.name
        )
        self.encoder.score_eos = score_eos
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
) -> Model:
    """Load a model and its processor (or tokenizer) by Hub id, local path or ``builtin:NAME``.

    Works offline for local paths and for cached models with ``HF_HUB_OFFLINE=1``. Remote code is
    never trusted unless ``trust_remote_code=True``.
    """
    dtype = _torch_dtype(dtype)
    if name_or_path.startswith("builtin:"):
        from canfast.zoo import load_builtin_model

        hf_model, processor = load_builtin_model(name_or_path.removeprefix("builtin:"), dtype)
    else:
        hf_model, processor = _load_pretrained(name_or_path, dtype, device_map, trust_remote_code)
    if device is not None and device_map is None:
        hf_model.to(device)
    hf_model.eval()
    return Model(hf_model, processor, name=name_or_path)


def _load_pretrained(name: str, dtype, device_map, trust_remote_code: bool):
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
    adapter = adapter_for(config.model_type)
    task = adapter.task
    if getattr(config, "is_encoder_decoder", False):
        task = "seq2seq"
    if adapter.uses_images:
        auto_model = transformers.AutoModelForImageTextToText
        auto_processor = transformers.AutoProcessor
    else:
        auto_model = {
            "causal": transformers.AutoModelForCausalLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM,
            "masked": transformers.AutoModelForMaskedLM,
        }[task]
        auto_processor = transformers.AutoTokenizer
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
