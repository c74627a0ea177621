"""What a sweep found, and its JSON form (``sweep.json``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class Curve:
    """Metric per k for one ordering of neurons, with its two stages.

    ``k1``: first k whose ratio reaches the onset threshold (degradation); ``k_star``: first k
    whose ``log10(ratio)`` reaches tau (collapse). None when not reached.
    """

    k: list[int] = field(default_factory=list)
    ppl: list[float] = field(default_factory=list)
    k1: int | None = None
    k_star: int | None = None
    seed: int | None = None

    def add(self, k: int, ppl: float) -> None:
        where = next((i for i, known in enumerate(self.k) if known > k), len(self.k))
        self.k.insert(where, k)
        self.ppl.insert(where, ppl)

    def ratio(self, ppl0: float) -> list[float]:
        return [p / ppl0 for p in self.ppl]


@dataclass
class SweepResult:
    kind: str
    metric: str
    tau: float
    onset: float
    n_neurons: int
    ppl0: float
    curve: Curve
    random: list[Curve] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    generations: list[dict] = field(default_factory=list)

    @property
    def k_star(self) -> int | None:
        return self.curve.k_star

    @property
    def k1(self) -> int | None:
        return self.curve.k1

    @property
    def random_k_star(self) -> float | None:
        """Median k* of the random sets; seeds that never collapsed count as beyond every k."""
        return _median([c.k_star for c in self.random])

    @property
    def random_k1(self) -> float | None:
        """Median onset k1 of the random sets, counted like ``random_k_star``."""
        return _median([c.k1 for c in self.random])

    def to_json(self) -> dict:
        def curve_json(c: Curve) -> dict:
            out = {"k": c.k, "ppl": c.ppl, "ratio": c.ratio(self.ppl0)}
            out |= {"log10_ratio": [math.log10(max(r, 1e-300)) for r in out["ratio"]]}
            out |= {"k1": c.k1, "k_star": c.k_star}
            if c.seed is not None:
                out["seed"] = c.seed
            return out

        return {
            "kind": self.kind,
            "criterion": {
                "metric": self.metric,
                "tau": self.tau,
                "collapse": "log10(ppl_k / ppl_0) >= tau",
                "onset_ratio": self.onset,
            },
            "n_neurons": self.n_neurons,
            "ppl0": self.ppl0,
            **curve_json(self.curve),
            "random": {
                "seeds": [curve_json(c) for c in self.random],
                "k_star_median": self.random_k_star,
                "k1_median": self.random_k1,
            },
            "timings": self.timings,
            **self.info,
        }

    @classmethod
    def from_json(cls, data: dict) -> SweepResult:
        def curve(d: dict) -> Curve:
            return Curve(list(d["k"]), list(d["ppl"]), d.get("k1"), d.get("k_star"), d.get("seed"))

        known = {"kind", "criterion", "n_neurons", "ppl0", "k", "ppl", "ratio", "log10_ratio"}
        known |= {"k1", "k_star", "random", "timings"}
        return cls(
            kind=data["kind"],
            metric=data["criterion"]["metric"],
            tau=data["criterion"]["tau"],
            onset=data["criterion"]["onset_ratio"],
            n_neurons=data["n_neurons"],
            ppl0=data["ppl0"],
            curve=curve(data),
            random=[curve(c) for c in data.get("random", {}).get("seeds", [])],
            timings=data.get("timings", {}),
            info={k: v for k, v in data.items() if k not in known},
        )

    def as_dict(self) -> dict:
        return asdict(self)


def _median(values: list[int | None]) -> float | None:
    """Median where None means "not reached": larger than any k, and None if it is the median."""
    if not values:
        return None
    ks = sorted(math.inf if v is None else v for v in values)
    mid = len(ks) // 2
    value = ks[mid] if len(ks) % 2 else (ks[mid - 1] + ks[mid]) / 2
    return None if math.isinf(value) else value
