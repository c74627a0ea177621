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
        head = getattr(hf_model, "get_output_embeddings", None)
        if head is not None and head() is None and not self.adapter.uses_images:
            # A bare model (BertModel, a sentence encoder): no head to score tokens with, so
            # only a custom objective can score it (the encoder reads its inputs alone).
            self.task = "base"
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
        """Inputs, aligned labels and target mask: the family's encoder
        (:mod:`canfast.adapters.encoders`) at work. Samples without any target (for a bare
        model, or an objective that needs none) give the inputs alone, no token scored. A
        sample longer than the model's positions, or a target of unknown tokens only, is bad
        input."""
        self._check_runnable()
        if self.task == "base" or all(s.target is None for s in samples):
            return check_encoded(self, samples, self.encoder.encode_inputs(samples))
        return check_encoded(self, samples, self.encoder.encode(samples))

    def encode_prompts(self, samples: Sequence[Sample]) -> dict[str, Tensor]:
        """Prompt inputs for generation, padded as the model generates from them."""
        self._check_runnable()
        inputs = self.encoder.encode_prompts(samples)
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if ids is not None:
            lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * len(samples)
            for sample, length in zip(samples, lengths, strict=True):
                if length == 0:
                    # Generation has nothing to start from; transformers fails on it obscurely.
                    raise BadInput(
                        f"prompt {sample.prompt[:40]!r} is no tokens at all to the tokenizer of "
                        f"{self.name}; give a prompt it can read"
                    )
        return inputs

    def _check_runnable(self) -> None:
        """Bad input for a model without a tokenizer: every run encodes first, so a model made
        from a config.json (the architecture alone, on the meta device) is refused here."""
        if self.processor is None:
            raise BadInput(
                f"model {self.name} has no tokenizer or processor to encode prompts with (one "
                "read from a config.json is the architecture alone: it maps sites, not runs)"
            )

    def forward(self, batch: Batch):
        inputs = dict(batch.inputs)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return self.hf(**inputs, use_cache=False)

    def __repr__(self) -> str:
        n = sum(s.channels for s in self.all_sites("out"))
        return f"Model({self.name!r}, family={self.adapter.family}, {n} FFN neurons)"


def max_positions(config) -> int | None:
    """The most token positions a model takes, from its (text) config; None when it has no hard
    limit (relative positions, as T5)."""
    if getattr(config, "is_encoder_decoder", False):
        return None
    text = getattr(config, "text_config", None) or config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_encoded(model: Model, samples: Sequence[Sample], batch: Batch) -> Batch:
    """Refuse a batch the model cannot read or whose score would mean nothing: a sample longer
    than the model's positions (it is refused, never truncated), or a target made only of
    unknown tokens."""
    limit = max_positions(model.hf.config)
    valid = batch.valid.get("language")
    if limit is not None and valid is not None and valid.shape[1] > limit:
        for sample, length in zip(samples, valid.sum(dim=1).tolist(), strict=True):
            if length > limit:
                raise BadInput(
                    f"a sample is {length} tokens long, over the {limit} positions "
                    f"{model.name} takes (prompt {sample.prompt[:40]!r}); shorten it"
                )
    tok = model.tokenizer
    unk = tok.unk_token_id
    if unk is None or model.task == "base":
        return batch
    special = set(tok.all_special_ids) - {unk}
    for sample, row in zip(samples, batch.labels.tolist(), strict=True):
        scored = [t for t in row if t != IGNORE and t not in special]
        if scored and all(t == unk for t in scored):
            raise BadInput(
                f"target {sample.target!r} becomes {len(scored)} unknown tokens "
                f"({tok.unk_token}) only: the tokenizer of {model.name} cannot read it"
            )
    return batch


def _torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16}
    names |= {"bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise BadInput(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    return names[dtype]


TASKS = ("auto", "base")
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def load(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    ffn_map: dict | str | Path | None = None,
    prompt_template: str | None = None,
    chat_template: bool = True,
    task: str = "auto",
    allow_pickle: bool = False,
) -> Model:
    """Load a model and its processor (or tokenizer) by Hub id, local path or ``builtin:NAME``.

    - ``task="auto"`` builds the model with the head its family is scored with (a language-model
      head, a masked-LM head). Every weight of that model must come from the checkpoint: a
      checkpoint without the head (a sentence encoder saved as ``BertModel``) is refused rather
      than scored with a randomly initialised head.
    - ``task="base"`` loads the bare model (``AutoModel``), for scoring with a custom
      ``objective=`` (see :mod:`canfast.objectives`); a pooler missing from the checkpoint is
      dropped, never left random.
    - Weights are read from safetensors only; a pickle checkpoint (``pytorch_model.bin``) needs
      ``allow_pickle=True`` and is then read with torch's ``weights_only`` loader.

    Works offline for local paths and for cached models with ``HF_HUB_OFFLINE=1``. Remote code is
    never trusted unless ``trust_remote_code=True``. ``ffn_map`` describes the FFN blocks of a
    family canfast has no rule for (:mod:`canfast.adapters.user_map`). A ``config.json`` file
    gives the model's architecture alone, on the meta device: no weights, no processor; enough
    for its site map (``canfast sites --model CONFIG.json``), not to run it. Prompts go through
    the model's chat template when it has one, unless ``chat_template=False`` or a
    ``prompt_template`` (with ``{prompt}``) is given.
    """
    if task not in TASKS:
        raise BadInput(f"unknown task {task!r}; choose 'auto' or 'base'")
    dtype = _torch_dtype(dtype)
    device = check_device(device)
    if name_or_path.endswith(".json") and Path(name_or_path).expanduser().is_file():
        hf_model = architecture_from_config(name_or_path, ffn_map)
        return Model(hf_model, None, name=name_or_path, ffn_map=ffn_map)
    if name_or_path.startswith("builtin:"):
        from canfast.zoo import load_builtin_model

        hf_model, processor = load_builtin_model(name_or_path.removeprefix("builtin:"), dtype)
    else:
        hf_model, processor = _load_pretrained(
            name_or_path, dtype, device_map, trust_remote_code, task, allow_pickle, ffn_map
        )
    if device is not None and device_map is None:
        hf_model.to(device)
    hf_model.eval()
    model = Model(
        hf_model,
        processor,
        name=name_or_path,
        prompt_template=prompt_template,
        ffn_map=ffn_map,
        chat_template=chat_template,
    )
    if task == "base":
        model.task = "base"
    return model


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


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` parsed and present on this machine, or bad input saying what is missing."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BadInput(f"unknown device {device!r} ({exc})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInput(f"device {device!r}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise BadInput(f"device {device!r}: this machine has {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput(f"device {device!r}: MPS is not available on this machine")
    return parsed


def _looks_local(name: str) -> bool:
    """A path rather than a Hub id: it starts with ``.``, ``/`` or ``~``, or its parent is an
    existing directory (``models/minilm`` next to a ``models`` folder)."""
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        return True
    parent = Path(name).expanduser().parent
    return str(parent) not in ("", ".") and parent.is_dir()


def _check_local(name: str) -> None:
    """Refuse a missing local model directory at once, before transformers asks the Hub."""
    local = Path(name).expanduser()
    if not local.exists():
        if _looks_local(name):
            raise BadInput(f"model not found: {name} (no such directory)")
        return
    if not local.is_dir():
        raise BadInput(f"model {name} is a file; pass the directory that holds it")
    if not (local / "config.json").is_file():
        raise BadInput(f"model {name}: no config.json in the directory")


def _check_weights(name: str, allow_pickle: bool) -> None:
    """Refuse a local model directory without weights, or with pickle weights only."""
    local = Path(name).expanduser()
    if not local.is_dir():
        return
    weights = [p.name for pattern in WEIGHT_FILES for p in local.glob(pattern)]
    if not weights:
        raise BadInput(f"model {name}: no weights in the directory (expected model.safetensors)")
    if not any(w.endswith(".safetensors") for w in weights) and not allow_pickle:
        raise BadInput(
            f"model {name}: only pickle weights ({weights[0]}); convert them to safetensors, "
            "or pass --allow-pickle (allow_pickle=True) to read them with torch's weights-only "
            "loader"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_pretrained(
    name: str,
    dtype,
    device_map,
    trust_remote_code: bool,
    task: str,
    allow_pickle: bool,
    ffn_map=None,
):
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoConfig

    _check_local(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise BadInput(f"cannot load model {name!r}: {_first_line(exc)}") from None
    adapter = adapter_for(config.model_type, ffn_map)
    _check_weights(name, allow_pickle)
    if task == "base":
        auto_model = transformers.AutoModel
    else:
        auto_model = _auto_model_class(adapter, config)
    kwargs = {"trust_remote_code": trust_remote_code, "output_loading_info": True}
    # Without allow_pickle, transformers must not fall back to pytorch_model.bin.
    kwargs["use_safetensors"] = None if allow_pickle else True
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise BadInput(
                "--device-map needs the accelerate package: pip install accelerate"
            ) from None
        kwargs["device_map"] = device_map
        from canfast.distributed import rank_max_memory

        share = rank_max_memory()
        if share is not None:
            kwargs["max_memory"] = share
    try:
        hf_model, info = auto_model.from_pretrained(name, **kwargs)
    except SafetensorError as exc:
        raise BadInput(
            f"model {name}: unreadable safetensors weights ({_first_line(exc)})"
        ) from None
    except (OSError, ValueError) as exc:
        hint = "" if allow_pickle or "safetensors" not in str(exc) else " (or --allow-pickle)"
        raise BadInput(f"cannot load model {name!r}: {_first_line(exc)}{hint}") from None
    _check_loaded(name, hf_model, info, task)
    try:
        if not adapter.uses_images:
            processor = transformers.AutoTokenizer.from_pretrained(
                name, trust_remote_code=trust_remote_code
            )
        else:
            from canfast.adapters.processors import load_processor

            processor = load_processor(name, config.model_type, trust_remote_code)
    except (OSError, ValueError, TypeError, ImportError) as exc:
        part = "processor" if adapter.uses_images else "tokenizer"
        raise BadInput(f"cannot load the {part} of {name!r}: {_first_line(exc)}") from None
    return hf_model, processor


def _check_loaded(name: str, hf_model: nn.Module, info: dict, task: str) -> None:
    """Refuse a model with weights the checkpoint did not hold: transformers initialises them
    at random, and scores of a random head describe a model that does not exist."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(
        str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ()
    )
    pooler = [k for k in missing if k.split(".")[0] == "pooler"]
    if task == "base" and pooler and getattr(hf_model, "pooler", None) is not None:
        # A sentence encoder saved without its pooler: drop it, so pooler_output is None
        # rather than random numbers.
        hf_model.pooler = None
        missing = [k for k in missing if k not in pooler]
    if mismatched:
        raise BadInput(
            f"model {name}: {len(mismatched)} weights in the checkpoint do not fit "
            f"{type(hf_model).__name__} (e.g. {mismatched[0]})"
        )
    if missing:
        head = sorted({k.rsplit(".", 2)[0] for k in missing})
        raise BadInput(
            f"model {name}: the checkpoint has no weights for {len(missing)} tensors of "
            f"{type(hf_model).__name__} (e.g. {missing[0]}; in {', '.join(head[:3])}), which "
            "would be random; load the base model with --task base (task='base') and score it "
            "with a custom objective= (canfast.objectives)"
        )


def quiet_transformers() -> None:
    """Keep transformers' and the Hub client's advisory warnings off the terminal of a
    command-line run: a model that cannot be fetched is then one ``canfast: error:`` line, not
    a retry log before it."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    try:
        import huggingface_hub.utils
        import transformers

        transformers.logging.set_verbosity_error()
        huggingface_hub.utils.logging.set_verbosity_error()
    except ImportError:
        pass
