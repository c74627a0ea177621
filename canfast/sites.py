"""Sites (the Linear layers of feed-forward blocks), neuron ids and selectors.

A site is named ``<component>.<layer>.<kind>``, e.g. ``language.12.down``; a neuron is a site
and a channel, ``language.12.down:2533``. Unit ``out`` neurons are output channels of a site;
unit ``mid`` neurons are the input channels of a block's ``down`` Linear, on sites named
``<component>.<layer>.mid``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

from canfast.errors import BadInput

COMPONENTS = ("vision", "projector", "qformer", "language")
KINDS = ("gate", "up", "down", "mid")
UNITS = ("out", "mid")


@dataclass(frozen=True)
class Site:
    """One FFN Linear of a model, as canfast sees it.

    ``module`` is the Linear (or GPT-2 ``Conv1D``) itself. For unit ``out`` the neurons are its
    output channels; for unit ``mid`` (kind ``mid``) they are its input channels. ``stream``
    names the token sequence the module runs over (``"language"``, ``"decoder"``, ...), which
    tells scoring which padding mask applies; None means every position is real. ``expert`` is
    ``"e<k>"`` for expert ``k`` of a mixture-of-experts layer, ``"shared"`` for its shared
    expert, and None for a dense FFN.
    """

    name: str
    component: str
    layer: int
    kind: str
    module_path: str
    channels: int
    module: nn.Module = field(repr=False, compare=False)
    stream: str | None = None
    expert: str | None = None

    @property
    def unit(self) -> str:
        return "mid" if self.kind == "mid" else "out"

    @property
    def transposed(self) -> bool:
        """GPT-2's Conv1D keeps its weight as [in, out], the transpose of nn.Linear."""
        return type(self.module).__name__ == "Conv1D"

    def neuron(self, channel: int) -> str:
        return f"{self.name}:{channel}"


def site_name(component: str, layer: int, kind: str, expert: str | None = None) -> str:
    """``language.12.down``, or ``language.3.e7.down`` for expert 7 of a mixture of experts."""
    if expert is None:
        return f"{component}.{layer}.{kind}"
    return f"{component}.{layer}.{expert}.{kind}"


@dataclass(frozen=True)
class SiteName:
    """The parts of a site name: ``component.layer.kind`` or ``component.layer.expert.kind``."""

    component: str
    layer: int
    kind: str
    expert: str | None = None


def parse_site_name(name: str) -> SiteName:
    """Split a site name into its parts; a name of neither form is bad input."""
    parts = name.split(".")
    ok = len(parts) in (3, 4) and parts[0] in COMPONENTS and parts[1].isdigit()
    ok = ok and parts[-1] in KINDS
    if ok and len(parts) == 4:
        expert = parts[2]
        ok = expert == "shared" or (expert[:1] == "e" and expert[1:].isdigit())
    if not ok:
        raise BadInput(
            f"bad site name {name!r}; expected COMPONENT.LAYER.KIND (language.12.down) or "
            "COMPONENT.LAYER.EXPERT.KIND (language.3.e7.down, language.3.shared.up)"
        )
    expert = parts[2] if len(parts) == 4 else None
    return SiteName(parts[0], int(parts[1]), parts[-1], expert)


def parse_neuron(neuron_id: str) -> tuple[str, int]:
    """Split ``"language.12.down:2533"`` into ``("language.12.down", 2533)``."""
    site, sep, channel = neuron_id.rpartition(":")
    if not sep or not site or not channel.isdigit():
        raise BadInput(
            f"bad neuron id {neuron_id!r}; expected SITE:CHANNEL, e.g. language.3.down:17"
        )
    return site, int(channel)


def select(
    sites: Sequence[Site],
    patterns: Iterable[str] | str | None = None,
    components: Iterable[str] | None = None,
    kinds: Iterable[str] | None = None,
) -> list[Site]:
    """The sites matching every given filter: glob patterns on names (any may match), components
    and kinds. A selector that matches nothing is an error, named in the message."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    patterns = [p.strip() for p in patterns or []]
    components = list(components or [])
    kinds = list(kinds or [])
    for component in components:
        if component not in COMPONENTS:
            raise BadInput(f"unknown component {component!r}; choose from {', '.join(COMPONENTS)}")
    for kind in kinds:
        if kind not in KINDS:
            raise BadInput(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    chosen = [
        s
        for s in sites
        if (not patterns or any(fnmatch.fnmatchcase(s.name, p) for p in patterns))
        and (not components or s.component in components)
        and (not kinds or s.kind in kinds)
    ]
    if not chosen:
        what = []
        if patterns:
            what.append(f"--sites {','.join(patterns)}")
        if components:
            what.append(f"--component {','.join(components)}")
        if kinds:
            what.append(f"--kind {','.join(kinds)}")
        raise BadInput(f"selector {' '.join(what) or '(none)'} matches no site of this model")
    return chosen


@dataclass(frozen=True)
class NeuronSet:
    """An ordered set of neurons, ``(site name, channel)`` pairs, with optional scores.

    The order is the ranking: ``top(k)`` of a ``Scores`` keeps the best first, so
    ``neurons[:k]`` is again the top k.
    """

    neurons: tuple[tuple[str, int], ...]
    scores: tuple[float, ...] | None = None

    @classmethod
    def from_ids(cls, ids: Iterable[str]) -> NeuronSet:
        return cls(tuple(parse_neuron(i) for i in ids))

    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(self.neurons)

    def __getitem__(self, index: slice) -> NeuronSet:
        if not isinstance(index, slice):
            raise TypeError("index a NeuronSet with a slice, e.g. neurons[:k]")
        scores = self.scores[index] if self.scores is not None else None
        return NeuronSet(self.neurons[index], scores)

    def ids(self) -> list[str]:
        return [f"{site}:{channel}" for site, channel in self.neurons]

    def by_site(self) -> dict[str, list[int]]:
        grouped: dict[str, list[int]] = {}
        for site, channel in self.neurons:
            grouped.setdefault(site, []).append(channel)
        return grouped

    def to_records(self) -> list[dict]:
        scores = self.scores if self.scores is not None else [None] * len(self)
        return [{"neuron": i, "score": s} for i, s in zip(self.ids(), scores, strict=True)]

    def __repr__(self) -> str:
        shown = ", ".join(self.ids()[:4])
        more = f", ... ({len(self)} in all)" if len(self) > 4 else ""
        return f"NeuronSet([{shown}{more}])"
