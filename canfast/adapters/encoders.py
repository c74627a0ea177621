"""Encoders: how a family's samples become model inputs, as Hugging Face data collators do.

An encoder puts a sample's prompt through the family's template and processor, joins the target
to it exactly as written, and returns the padded inputs with the labels and the target mask
that every loss in canfast is computed from (:class:`Batch`). One class per task: decoder
(``causal``), encoder-decoder (``seq2seq``) and masked LM (``masked``); the family's adapter
supplies the template, the separator and the token streams that pad apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from canfast.adapters.chat import chat_prompt
from canfast.adapters.tokens import TOKEN_KEYS, extend_tokens, trim_tokens
from canfast.data import Sample, processor_image_side
from canfast.errors import BadInput

IGNORE = -100


@dataclass
class Batch:
    """Model inputs for a list of samples, right-padded.

    - ``inputs``: the keyword arguments of the model's forward.
    - ``labels``: ``[B, L]`` aligned with the logits: ``labels[i, t]`` is the token that logit row
      ``t`` must predict, or -100 where no target is scored.
    - ``target_mask``: bool, True at the target tokens of the sequence they belong to (the input
      sequence of a decoder-only or masked model, the decoder sequence of an encoder-decoder).
    - ``valid``: per token stream (``"language"``, ``"decoder"``), a bool ``[B, T]`` marking the
      real (non-padding) positions; a stream absent here has no padding.
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    target_mask: Tensor
    valid: dict[str, Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        move = {k: v.to(device) for k, v in self.inputs.items()}
        return Batch(
            move,
            self.labels.to(device),
            self.target_mask.to(device),
            {k: v.to(device) for k, v in self.valid.items()},
        )

    def repeat(self, times: int) -> Batch:
        """The batch stacked ``times`` times, block by block (for a batch of masks)."""
        if times == 1:
            return self

        def tile(t: Tensor) -> Tensor:
            return t.repeat(times, *([1] * (t.dim() - 1)))

        return Batch(
            {k: tile(v) for k, v in self.inputs.items()},
            tile(self.labels),
            tile(self.target_mask),
            {k: tile(v) for k, v in self.valid.items()},
        )


class Encoder:
    """The shared half: prompt text, processor calls, target tokens, padding.

    - ``template``: how a prompt becomes the model's text (``"{prompt}"`` fills it in); a prompt
      that already holds ``<image>`` is taken as written.
    - ``separator``: what goes between the prompt's text and the target (see :meth:`join`).
    - ``own_padding``: input-key prefixes with a tokenizer of their own, always padded on the
      right with that tokenizer's pad id, mapped to the processor attribute holding it.
    - ``score_eos``: append EOS to every target and score it.
    """

    def __init__(
        self,
        processor,
        template: str = "{prompt}",
        separator: str = " ",
        uses_images: bool = False,
        own_padding: dict[str, str] | None = None,
        score_eos: bool = True,
        name: str = "the model",
        target_token_type: int = 0,
    ) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template = template
        self.separator = separator
        self.uses_images = uses_images
        self.own_padding = dict(own_padding or {})
        self.score_eos = score_eos
        self.name = name
        self.target_token_type = target_token_type
        self.chat = False  # the model's chat template writes the prompt (Model decides)

    def prompt_text(self, sample: Sample) -> str:
        if "<image>" in sample.prompt:
            return sample.prompt
        if self.chat:
            return chat_prompt(self.processor, sample.prompt, self.uses_images)
        return self.template.format(prompt=sample.prompt)

    def process(self, sample: Sample, text: str) -> dict[str, Tensor]:
        """One sample through the processor (with its image) or the tokenizer."""
        if self.uses_images:
            if sample.image is None:
                raise BadInput(
                    f"{self.name} needs an image for every sample (prompt {sample.prompt!r})"
                )
            image = sample.load_image(need=processor_image_side(self.processor))
            encoded = dict(self.processor(images=[image], text=[text], return_tensors="pt"))
            encoded.pop("labels", None)  # PaliGemma's processor offers some; canfast makes its own
            return encoded
        return dict(self.tokenizer([text], return_tensors="pt"))

    def join(self, prompt_text: str, target: str) -> str:
        """The text that is scored: the prompt, the template's separator, the target.

        The separator goes only between two non-space characters: a prompt that ends in a space
        or a newline, a target that starts with one, or an empty prompt join as written.
        """
        if not prompt_text or prompt_text[-1].isspace() or target[:1].isspace():
            return prompt_text + target
        return prompt_text + self.separator + target

    def target_ids(self, prompt_text: str, target: str) -> tuple[list[int], list[int]]:
        """The target's tokens as they follow the prompt, without special tokens, and the
        prompt's trailing tokens that the joined text tokenizes differently.

        The joined text is tokenized whole, so the tokens at the boundary are the ones the
        tokenizer makes of the text as written (a byte-level BPE merges a prompt's trailing
        space into the target's first word, ``'Ġone'``); those prompt tokens are replaced.
        """
        tok = self.tokenizer
        alone = list(tok(prompt_text, add_special_tokens=False)["input_ids"])
        joined = list(tok(self.join(prompt_text, target), add_special_tokens=False)["input_ids"])
        shared = 0
        while shared < min(len(alone), len(joined)) and alone[shared] == joined[shared]:
            shared += 1
        if shared == len(joined):
            raise BadInput(f"target {target!r} has no tokens of its own after the prompt")
        return alone[shared:], joined[shared:]

    def eos(self) -> list[int]:
        """The EOS id to append to a target: none when EOS is not scored or does not exist."""
        eos = self.tokenizer.eos_token_id
        return [] if eos is None or not self.score_eos else [eos]

    def encode(self, samples: Sequence[Sample]) -> Batch:
        """Inputs, aligned labels and masks for samples that all have targets."""
        missing = [s.prompt for s in samples if s.target is None]
        if missing:
            raise BadInput(f"{len(missing)} of {len(samples)} samples have no target")
        return self._encode(samples)

    def encode_inputs(self, samples: Sequence[Sample]) -> Batch:
        """The prompts alone, no token scored: for a bare model, or an objective that needs no
        targets (it reads the outputs)."""
        rows = [self.process(s, self.prompt_text(s)) for s in samples]
        inputs = self.collate(rows, side="right")
        labels = torch.full_like(inputs["input_ids"], IGNORE)
        valid = {"language": inputs["attention_mask"].bool()}
        return Batch(inputs, labels, labels != IGNORE, valid)

    def _encode(self, samples: Sequence[Sample]) -> Batch:
        raise NotImplementedError

    def encode_prompts(self, samples: Sequence[Sample]) -> dict[str, Tensor]:
        """Left-padded prompt inputs for generation."""
        rows = [self.process(s, self.prompt_text(s)) for s in samples]
        return self.collate(rows, side=self.prompt_side)

    prompt_side = "left"

    def collate(self, rows: list[dict[str, Tensor]], side: str) -> dict[str, Tensor]:
        """Stack per-sample encodings, padding every token sequence on ``side``.

        A stream in ``own_padding`` (InstructBLIP's Q-Former text) is padded on the right with
        its own tokenizer's pad id whatever ``side`` is: it takes absolute positions, so left
        padding would shift it.
        """
        pad_id = self.tokenizer.pad_token_id
        out: dict[str, Tensor] = {}
        for key in rows[0]:
            tensors = [r[key] for r in rows]
            if key not in TOKEN_KEYS and not any(key.startswith(p) for p in self.own_padding):
                if any(t.shape[1:] != tensors[0].shape[1:] for t in tensors):
                    if key in ("pixel_values", "pixel_attention_mask") and (
                        "image_sizes" in rows[0] or "pixel_attention_mask" in rows[0]
                    ):
                        out[key] = _pad_images(tensors)
                        continue
                    raise BadInput(
                        f"{key} of different sizes in one batch (images of different sizes?); "
                        "use batch_size=1 or resize the images to one size"
                    )
                out[key] = torch.cat(tensors, dim=0)
                continue
            fill = pad_id if key.endswith("input_ids") else 0
            key_side = side
            owner = next((p for p in self.own_padding if key.startswith(p)), None)
            if owner is not None:
                key_side = "right"
                own = getattr(self.processor, self.own_padding[owner], None)
                if key.endswith("input_ids") and own is not None:
                    fill = own.pad_token_id or 0
            width = max(t.shape[1] for t in tensors)
            shape = (len(rows), width, *tensors[0].shape[2:])
            padded = torch.full(shape, fill, dtype=tensors[0].dtype)
            for i, t in enumerate(tensors):
                n = t.shape[1]
                if key_side == "right":
                    padded[i, :n] = t[0]
                else:
                    padded[i, width - n :] = t[0]
            out[key] = padded
        if "attention_mask" not in out and "input_ids" in out:
            out["attention_mask"] = (out["input_ids"] != pad_id).long()
        return out


class CausalEncoder(Encoder):
    """Decoder models: the prompt joined to the target as written (:meth:`join`), then EOS,
    scored on the target's tokens and EOS. With an empty prompt and no BOS, no logit predicts
    the first target token."""

    def _encode(self, samples: Sequence[Sample]) -> Batch:
        rows, starts = [], []
        for sample in samples:
            text = self.prompt_text(sample)
            encoded = self.process(sample, text)
            replaced, ids = self.target_ids(text, sample.target)
            prompt = encoded["input_ids"]
            if replaced:
                if prompt[0, -len(replaced) :].tolist() != replaced:
                    raise BadInput(
                        f"cannot join prompt {text!r} and target {sample.target!r} at a token "
                        "boundary: the processor's prompt does not end as the tokenizer's does"
                    )
                prompt = prompt[:, : -len(replaced)]
            target = torch.tensor([ids + self.eos()], dtype=prompt.dtype)
            starts.append(prompt.shape[1])
            trim_tokens(encoded, prompt.shape[1])
            extend_tokens(encoded, target, self.target_token_type)
            rows.append(encoded)
        inputs = self.collate(rows, side="right")
        ids, attention = inputs["input_ids"], inputs["attention_mask"]
        positions = torch.arange(ids.shape[1])
        lengths = attention.sum(dim=1)
        start = torch.tensor(starts)
        target_mask = (positions >= start[:, None]) & (positions < lengths[:, None])
        labels = torch.full_like(ids, IGNORE)
        labels[:, :-1] = torch.where(target_mask[:, 1:], ids[:, 1:], IGNORE)
        return Batch(inputs, labels, target_mask, {"language": attention.bool()})


class Seq2SeqEncoder(Encoder):
    """Encoder-decoders: the encoder reads the prompt; the decoder is scored on target + EOS."""

    prompt_side = "right"

    def _encode(self, samples: Sequence[Sample]) -> Batch:
        rows, targets = [], []
        for sample in samples:
            rows.append(self.process(sample, self.prompt_text(sample)))
            ids = self.tokenizer(sample.target, add_special_tokens=False)["input_ids"]
            targets.append(list(ids) + self.eos())
        inputs = self.collate(rows, side="right")
        width = max(len(t) for t in targets)
        labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
        for i, t in enumerate(targets):
            labels[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        target_mask = labels != IGNORE
        # The model shifts labels right into decoder inputs; padding positions stay -100.
        inputs["labels"] = labels
        valid = {"language": inputs["attention_mask"].bool(), "decoder": target_mask}
        return Batch(inputs, labels, target_mask, valid)


class MaskedEncoder(Encoder):
    """Masked LMs: scored at the prompt's mask tokens, the target's words filling them."""

    def _encode(self, samples: Sequence[Sample]) -> Batch:
        tok = self.tokenizer
        if tok.mask_token_id is None:
            raise BadInput(f"{self.name}: the tokenizer has no mask token")
        rows, fills = [], []
        for sample in samples:
            encoded = self.process(sample, self.prompt_text(sample))
            where = (encoded["input_ids"][0] == tok.mask_token_id).nonzero().flatten()
            wanted = tok.convert_tokens_to_ids(sample.target.split())
            if len(wanted) != len(where):
                raise BadInput(
                    f"prompt {sample.prompt!r} has {len(where)} mask tokens but target "
                    f"{sample.target!r} has {len(wanted)} tokens"
                )
            rows.append(encoded)
            fills.append((where, wanted))
        inputs = self.collate(rows, side="right")
        labels = torch.full_like(inputs["input_ids"], IGNORE)
        for i, (where, wanted) in enumerate(fills):
            labels[i, where] = torch.tensor(wanted, dtype=torch.long)
        target_mask = labels != IGNORE
        return Batch(inputs, labels, target_mask, {"language": inputs["attention_mask"].bool()})


ENCODERS: dict[str, type[Encoder]] = {
    "causal": CausalEncoder,
    "seq2seq": Seq2SeqEncoder,
    "masked": MaskedEncoder,
}


def _pad_images(tensors: list[Tensor]) -> Tensor:
    """Stack images of different sizes (or tile counts) with zeros after each one's end: the
    models that take ``image_sizes`` (LLaVA-NeXT, OneVision, Pixtral) crop each image back to
    its own size, or tile count, before the vision tower, and Idefics3 / SmolVLM drop all-zero
    tiles, as their processors' padding expects."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = tensors[0].new_zeros(sum(t.shape[0] for t in tensors), *shape)
    start = 0
    for t in tensors:
        out[(slice(start, start + t.shape[0]), *(slice(0, n) for n in t.shape[1:]))] = t
        start += t.shape[0]
    return out
