"""What every adapter shares: the adapter record and the structural search for FFN blocks.

FFN blocks are found by the names of a module's children, not by full paths, so the same rules
hold across the module layouts of transformers 4.x and 5.x (``model.language_model.layers``
versus ``language_model.model.layers`` and so on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from canfast.adapters.encoders import ENCODERS, Encoder
from canfast.sites import Site, site_name

# Children that make a module an FFN block, and the kind each plays. Order matters only for
# readability: a module matches the first pattern whose names are all among its children.
FFN_PATTERNS: tuple[dict[str, str], ...] = (
    {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},  # Llama, Mistral, Qwen2
    {"wi_0": "gate", "wi_1": "up", "wo": "down"},  # T5 v1.1 / Flan-T5 gated FFN
    {"wi": "up", "wo": "down"},  # T5
    {"fc1": "up", "fc2": "down"},  # CLIP, BLIP ViT, OPT
    {"c_fc": "up", "c_proj": "down"},  # GPT-2 (Conv1D)
    {"dense_h_to_4h": "up", "dense_4h_to_h": "down"},  # GPT-NeoX
    {"linear_1": "up", "linear_2": "down"},  # LLaVA's projector
    {"intermediate_query.dense": "up", "output_query.dense": "down"},  # Q-Former, query tokens
    {"intermediate.dense": "up", "output.dense": "down"},  # BERT
)


@dataclass(frozen=True)
class Adapter:
    """How canfast drives one model family.

    - ``task``: ``causal`` (decoder LM, possibly with an image), ``seq2seq`` (encoder-decoder)
      or ``masked`` (encoder with a masked-LM head).
    - ``component_of``: the component (vision, projector, qformer, language) of a module path.
    - ``stream_of``: which token sequence a module runs over, to pick its padding mask.
    - ``prompt_template``: how a sample's prompt becomes the model's text.
    - ``target_separator``: what the template puts between the prompt's text and the target
      (see ``Encoder.join``): a space, as chat formats answer and as a word follows a word.
    - ``own_padding``: input-key prefixes padded apart with a tokenizer of their own, and the
      processor attribute holding it (InstructBLIP's Q-Former text).
    """

    family: str
    model_types: tuple[str, ...]
    task: str
    component_of: Callable[[str], str]
    stream_of: Callable[[str], str | None]
    prompt_template: str = "{prompt}"
    target_separator: str = " "
    own_padding: tuple[tuple[str, str], ...] = ()
    uses_images: bool = False
    extra_single_sites: tuple[tuple[str, str], ...] = ()

    def encoder(
        self,
        processor,
        task: str,
        template: str | None = None,
        separator: str | None = None,
        name: str = "the model",
    ) -> Encoder:
        """This family's encoder for ``task``; ``template`` and ``separator`` override its own."""
        return ENCODERS[task](
            processor,
            template=self.prompt_template if template is None else template,
            separator=self.target_separator if separator is None else separator,
            uses_images=self.uses_images,
            own_padding=dict(self.own_padding),
            name=name,
        )


def component_by_keyword(path: str) -> str:
    """The component of a module path, by the words in it."""
    if "qformer" in path:
        return "qformer"
    if "projector" in path or "language_projection" in path:
        return "projector"
    if "vision" in path or "visual" in path:
        return "vision"
    return "language"


def _child(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None) if isinstance(module, nn.Module) else None
        if module is None:
            return None
    return module if _is_linear(module) else None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _channels(module: nn.Module, side: str) -> int:
    """Output (``side="out"``) or input channels of a Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features if side == "out" else module.in_features
    rows, cols = module.weight.shape  # Conv1D: [in, out]
    return cols if side == "out" else rows


def find_sites(model: nn.Module, adapter: Adapter, unit: str = "out") -> list[Site]:
    """Every FFN site of ``model`` for ``unit``, in module order.

    Layers are numbered per component in the order their blocks appear, so an encoder-decoder
    language model numbers its decoder blocks after its encoder blocks.
    """
    sites: list[Site] = []
    counters: dict[str, int] = {}
    claimed: set[int] = set()
    for path, module in model.named_modules():
        for pattern in FFN_PATTERNS:
            children = {kind: _child(module, name) for name, kind in pattern.items()}
            if any(c is None for c in children.values()):
                continue
            if any(id(c) in claimed for c in children.values()):
                continue
            claimed.update(id(c) for c in children.values())
            component = adapter.component_of(path)
            layer = counters.get(component, 0)
            counters[component] = layer + 1
            stream = adapter.stream_of(path)
            names = {kind: name for name, kind in pattern.items()}
            for kind, child in children.items():
                child_path = f"{path}.{names[kind]}" if path else names[kind]
                if unit == "out":
                    sites.append(
                        Site(
                            site_name(component, layer, kind),
                            component,
                            layer,
                            kind,
                            child_path,
                            _channels(child, "out"),
                            child,
                            stream,
                        )
                    )
                elif kind == "down":
                    sites.append(
                        Site(
                            site_name(component, layer, "mid"),
                            component,
                            layer,
                            "mid",
                            child_path,
                            _channels(child, "in"),
                            child,
                            stream,
                        )
                    )
            break
    for path, kind in adapter.extra_single_sites:
        module = _child(model, path)
        if module is None or unit != "out":
            continue
        component = adapter.component_of(path)
        layer = counters.get(component, 0)
        counters[component] = layer + 1
        channels = _channels(module, "out")
        name = site_name(component, layer, kind)
        sites.append(Site(name, component, layer, kind, path, channels, module, None))
    return sites
