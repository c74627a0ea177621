"""What every adapter shares: the adapter record and the structural search for FFN blocks.

FFN blocks are found by the names of a module's children, not by full paths, so the same rules
hold across the module layouts of transformers 4.x and 5.x (``model.language_model.layers``
versus ``language_model.model.layers`` and so on).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from canfast.adapters.encoders import ENCODERS, Encoder
from canfast.adapters.views import expose_experts, is_linear_view, split_fused_gate_up
from canfast.sites import Site, site_name

# Children that make a module an FFN block, and the kind each plays. Order matters only for
# readability: a module matches the first pattern whose names are all among its children.
FFN_PATTERNS: tuple[dict[str, str], ...] = (
    {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"},  # Llama, Mistral, Qwen2, Gemma
    # Phi-3's fused gate_up_proj, split into its two halves by views (adapters/views.py).
    {"gate_up_proj.gate": "gate", "gate_up_proj.up": "up", "down_proj": "down"},
    {"wi_0": "gate", "wi_1": "up", "wo": "down"},  # T5 v1.1 / Flan-T5 gated FFN
    {"wi": "up", "wo": "down"},  # T5
    {"fc1": "up", "fc2": "down"},  # CLIP, BLIP ViT, OPT
    {"c_fc": "up", "c_proj": "down"},  # GPT-2 (Conv1D)
    {"dense_h_to_4h": "up", "dense_4h_to_h": "down"},  # GPT-NeoX
    {"linear_1": "up", "linear_2": "down"},  # LLaVA's projector
    {"linear_fc1": "up", "linear_fc2": "down"},  # Qwen3-VL vision blocks and mergers
    {"mlp.0": "up", "mlp.2": "down"},  # Qwen2-VL / Qwen2.5-VL patch merger (a Sequential)
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
    - ``extra_single_sites``: lone Linears that are sites of their own (a one-layer projector).
    - ``blocks``: FFN blocks described by module path, for families no built-in pattern knows
      (a user's map, :mod:`canfast.adapters.user_map`); when given, only these are searched.
    - ``components`` and ``notes``: what the README's table of families says.
    - ``target_token_type``: the token type id of answer tokens (PaliGemma marks its suffix 1).
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
    blocks: tuple[Block, ...] = ()
    components: tuple[str, ...] = ("language",)
    notes: str = ""
    target_token_type: int = 0

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
            target_token_type=self.target_token_type,
        )


@dataclass(frozen=True)
class Block:
    """FFN blocks named by a glob over module paths, with their Linears' kinds by child name
    (dotted names reach grandchildren), e.g. ``Block("model.layers.*.ffn", {"w1": "up",
    "w2": "down"})``."""

    path: str
    linears: dict[str, str]
    component: str | None = None


def component_by_keyword(path: str) -> str:
    """The component of a module path, by the words in it."""
    if "qformer" in path:
        return "qformer"
    if "projector" in path or "language_projection" in path or "connector" in path:
        return "projector"
    if "merger" in path:  # Qwen-VL: the patch merger(s) carry vision features to the LM
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
    return (
        isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" or is_linear_view(module)
    )


def _channels(module: nn.Module, side: str) -> int:
    """Output (``side="out"``) or input channels of a Linear or a Conv1D."""
    if isinstance(module, nn.Linear) or is_linear_view(module):
        return module.out_features if side == "out" else module.in_features
    rows, cols = module.weight.shape  # Conv1D: [in, out]
    return cols if side == "out" else rows


def _block_sites(
    component: str,
    layer: int,
    stream: str | None,
    linears: dict[str, tuple[str, nn.Module]],
    unit: str,
    expert: str | None = None,
) -> list[Site]:
    """The sites of one FFN block: ``linears`` maps kind to (module path, Linear)."""
    sites = []
    for kind, (path, child) in linears.items():
        if unit == "out":
            name = site_name(component, layer, kind, expert)
            channels = _channels(child, "out")
            sites.append(Site(name, component, layer, kind, path, channels, child, stream, expert))
        elif kind == "down":
            name = site_name(component, layer, "mid", expert)
            channels = _channels(child, "in")
            sites.append(Site(name, component, layer, "mid", path, channels, child, stream, expert))
    return sites


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _shared_expert(model: nn.Module, experts_path: str) -> tuple[str, nn.Module] | None:
    parent_path = experts_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    for name in ("shared_expert", "shared_experts", "shared_mlp"):
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return _join(parent_path, name), module
    return None


def _match(module: nn.Module, path: str, pattern: dict[str, str]):
    children = {}
    for name, kind in pattern.items():
        child = _child(module, name)
        if child is None:
            return None
        children[kind] = (_join(path, name), child)
    return children


def find_sites(model: nn.Module, adapter: Adapter, unit: str = "out") -> list[Site]:
    """Every FFN site of ``model`` for ``unit``, in module order.

    Layers are numbered per component in the order their blocks appear, so an encoder-decoder
    language model numbers its decoder blocks after its encoder blocks. A mixture-of-experts
    layer is one layer: its experts are sites ``<component>.<layer>.e<k>.<kind>`` and its shared
    expert ``<component>.<layer>.shared.<kind>``.

    The first call exposes fused gate/up Linears and stacked experts as Linear views
    (:mod:`canfast.adapters.views`), which changes how those modules compute, not what.
    """
    split_fused_gate_up(model)
    expose_experts(model)
    sites: list[Site] = []
    counters: dict[str, int] = {}
    claimed: set[int] = set()

    def next_layer(component: str) -> int:
        layer = counters.get(component, 0)
        counters[component] = layer + 1
        return layer

    for path, module in model.named_modules():
        experts = getattr(module, "canfast_experts", None)
        if isinstance(experts, nn.ModuleList) and id(module) not in claimed:
            component = adapter.component_of(path)
            layer = next_layer(component)
            stream = adapter.stream_of(path)
            for e, expert in enumerate(experts):
                base = _join(path, f"canfast_experts.{e}")
                found = _match(expert, base, FFN_PATTERNS[0])
                claimed.update(id(c) for _, c in found.values())
                sites += _block_sites(component, layer, stream, found, unit, f"e{e}")
            shared = _shared_expert(model, path)
            if shared is not None:
                for pattern in FFN_PATTERNS:
                    found = _match(shared[1], shared[0], pattern)
                    if found is not None:
                        claimed.update(id(c) for _, c in found.values())
                        sites += _block_sites(component, layer, stream, found, unit, "shared")
                        break
            continue
        if adapter.blocks:
            rules = [
                (b.linears, b.component)
                for b in adapter.blocks
                if fnmatch.fnmatchcase(path, b.path)
            ]
        else:
            rules = [(pattern, None) for pattern in FFN_PATTERNS]
        for pattern, component in rules:
            found = _match(module, path, pattern)
            if found is None or any(id(c) in claimed for _, c in found.values()):
                continue
            claimed.update(id(c) for _, c in found.values())
            component = component or adapter.component_of(path)
            layer = next_layer(component)
            sites += _block_sites(component, layer, adapter.stream_of(path), found, unit)
            break
    for path, kind in adapter.extra_single_sites:
        module = _child(model, path)
        if module is None or unit != "out":
            continue
        component = adapter.component_of(path)
        layer = next_layer(component)
        channels = _channels(module, "out")
        name = site_name(component, layer, kind)
        sites.append(Site(name, component, layer, kind, path, channels, module, None))
    return sites
