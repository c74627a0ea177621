"""What a collapse sweep found, its files (``sweep.json``, ``generations.jsonl``) and its
printed summary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from canfast.sites import NeuronSet
from canfast.tables import table

SWEEP_FILE = "sweep.json"
COLLAPSE_RULE = "log10(ppl_k / ppl_0) >= tau"
GENERATIONS_FILE = "generations.jsonl"
# The columns of a --by table, in the order sweep.json stores each row's values.
BY_COLUMNS = ("group", "n_neurons", "n_samples", "ppl0", "k1", "k_star", "random_k_star")


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

    def log10_ratio(self, ppl0: float) -> list[float]:
        """``log10(PPL_k / PPL_0)`` per k: inf for an overflowed perplexity, nan for nan."""
        return [math.log10(max(r, 1e-300)) if r == r else r for r in self.ratio(ppl0)]

    def ppl_at(self, k: int) -> float | None:
        """The metric measured at ``k``, or None if this curve has no such k."""
        return self.ppl[self.k.index(k)] if k in self.k else None

    @property
    def largest_k(self) -> int | None:
        return max(self.k, default=None)


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
            out |= {"log10_ratio": c.log10_ratio(self.ppl0)}
            out |= {"k1": c.k1, "k_star": c.k_star}
            if c.seed is not None:
                out["seed"] = c.seed
            return out

        return {
            "kind": self.kind,
            "criterion": {
                "metric": self.metric,
                "tau": self.tau,
                "collapse": COLLAPSE_RULE,
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
    def load(cls, run_dir: str | Path) -> SweepResult:
        """The sweep of a run directory: ``sweep.json``, with ``generations.jsonl`` when it is
        there. Bad input when the directory or the file is missing or is not a sweep."""
        from canfast.errors import BadInput
        from canfast.io import read_json

        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise BadInput(f"run directory not found: {run_dir}")
        if not (run_dir / SWEEP_FILE).is_file():
            raise BadInput(f"{run_dir}: no {SWEEP_FILE} in this run directory")
        data = read_json(run_dir / SWEEP_FILE)
        try:
            result = cls.from_json(data)
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"{run_dir / SWEEP_FILE}: not a canfast sweep") from None
        if (run_dir / GENERATIONS_FILE).is_file():
            result.generations = _read_jsonl(run_dir / GENERATIONS_FILE)
        return result

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

    def write(self, run_dir: Path) -> list[Path]:
        """Write ``sweep.json`` and ``generations.jsonl`` into ``run_dir``."""
        from canfast.io import write_json, write_jsonl

        run_dir = Path(run_dir)
        return [
            write_json(run_dir / SWEEP_FILE, self.to_json()),
            write_jsonl(run_dir / GENERATIONS_FILE, self.generations),
        ]

    def summary_json(self) -> dict:
        return {
            "k_star": self.k_star,
            "k1": self.k1,
            "random_k_star": self.random_k_star,
            "ppl0": self.ppl0,
        }

    def summary(self, ranking: NeuronSet | None = None) -> str:
        """The curve with its stages, CAN against the random seeds, the top neurons up to k*
        (from ``ranking``), and one table per ``--by`` grouping."""
        ratios = self.curve.ratio(self.ppl0)
        rows = []
        for k, ratio in zip(self.curve.k, ratios, strict=True):
            stage = "collapse (k*)" if k == self.k_star else "onset (k1)" if k == self.k1 else ""
            rows.append([k, ratio * self.ppl0, ratio, math.log10(max(ratio, 1e-300)), stage])
        lines = [
            f"PPL_0 = {self.ppl0:.4g} over {self.info.get('n_samples')} samples, "
            f"{self.n_neurons} neurons in {len(self.info.get('sites', []))} sites"
        ]
        if rows:
            lines.append(table(["k", "ppl", "ratio", "log10 ratio", "stage"], rows))
        lines.append("")
        stages = [["CAN", self.k1, self.k_star]]
        stages += [[f"random seed {c.seed}", c.k1, c.k_star] for c in self.random]
        stages.append(["random median", self.random_k1, self.random_k_star])
        lines.append(table(["ordering", "k1", "k*"], stages))
        if self.k_star is not None and ranking is not None:
            lines.append("")
            lines.append("top neurons: " + ", ".join(ranking[: min(self.k_star, 8)].ids()))
        for grouping, group_rows in self.info.get("by", {}).items():
            lines.append("")
            headers = [grouping, "neurons", "samples", "ppl0", "k1", "k*", "random k*"]
            lines.append(table(headers, [[r[c] for c in BY_COLUMNS] for r in group_rows]))
        return "\n".join(lines)


def _read_jsonl(path: Path) -> list[dict]:
    import json

    from canfast.errors import BadInput

    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path}: malformed JSON on line {number} ({exc.msg})") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def _median(values: list[int | None]) -> float | None:
    """Median where None means "not reached": larger than any k, and None if it is the median."""
    if not values:
        return None
    ks = sorted(math.inf if v is None else v for v in values)
    mid = len(ks) // 2
    value = ks[mid] if len(ks) % 2 else (ks[mid - 1] + ks[mid]) / 2
    return None if math.isinf(value) else value
