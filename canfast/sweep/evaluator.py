"""The sweep evaluator: the collapse metric of many neuron sets, several sets per forward pass.

For the teacher-forced metric, ``masks_per_pass`` sets share one forward: the batch is stacked
once per set and each block gets its own mask (``masked_linear`` with ``[M, C]`` masks), which
keeps small models busy and large ones from re-reading their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from canfast.data import Sample
from canfast.mask import masked
from canfast.model import Model
from canfast.objective import Objective, evaluate, generate_answers
from canfast.sites import NeuronSet

METRICS = ("ppl", "gen-ppl")


class Evaluator:
    """Computes the sweep metric of the model with a neuron set masked.

    ``ppl``: teacher-forced perplexity of the fixed targets. ``gen-ppl``: the masked model
    generates, and the unmasked model scores the perplexity of what it generated, which catches
    degenerate output that teacher forcing hides.
    """

    def __init__(
        self,
        model: Model,
        samples: Sequence[Sample],
        metric: str = "ppl",
        batch_size: int = 8,
        masks_per_pass: int = 4,
        max_new_tokens: int = 32,
        objective: Objective | None = None,
        backend: str = "auto",
        progress: bool = True,
    ) -> None:
        self.model = model
        self.samples = list(samples)
        self.metric = metric
        self.batch_size = batch_size
        self.masks_per_pass = max(1, masks_per_pass if metric == "ppl" else 1)
        self.max_new_tokens = max_new_tokens
        self.objective = objective
        self.backend = backend
        self.calls = 0
        self.bar = tqdm(desc="masked evaluations", unit="mask", disable=not progress)

    def close(self) -> None:
        self.bar.close()

    def __call__(self, sets: Sequence[NeuronSet]) -> list[float]:
        values: list[float] = []
        step = self.masks_per_pass
        for start in range(0, len(sets), step):
            group = list(sets[start : start + step])
            values += self._ppl(group) if self.metric == "ppl" else [self._gen_ppl(group[0])]
            self.bar.update(len(group))
        self.calls += len(sets)
        return values

    def _ppl(self, group: list[NeuronSet]) -> list[float]:
        with masked(self.model, group, backend=self.backend):
            results = evaluate(
                self.model, self.samples, self.batch_size, self.objective, masks=len(group)
            )
        return [r.ppl for r in results]

    def _gen_ppl(self, neurons: NeuronSet) -> float:
        with masked(self.model, [neurons], backend=self.backend):
            answers = generate_answers(
                self.model, self.samples, self.max_new_tokens, self.batch_size
            )
        produced = [s.with_target(a) for s, a in zip(self.samples, answers, strict=True)]
        return evaluate(self.model, produced, self.batch_size, self.objective)[0].ppl
