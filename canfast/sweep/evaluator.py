"""The sweep evaluator: the collapse metric of many neuron sets, several sets per forward pass.

For the teacher-forced metric, ``masks_per_pass`` sets share one forward: the batch is stacked
once per set and each block gets its own mask (``masked_linear`` with ``[M, C]`` masks), which
keeps small models busy and large ones from re-reading their inputs. Each such group is one
chunk of :class:`~canfast.work.Work`: kept as it finishes, and dealt to the ranks of a torchrun
job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from canfast.data import Sample
from canfast.mask import masked
from canfast.model import Model
from canfast.objective import Objective, evaluate, evaluate_batches, generate_answers
from canfast.score import data_fingerprint
from canfast.sites import NeuronSet
from canfast.sweep.reuse import SharedWork
from canfast.work import Work, content_key

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
        work: Work | None = None,
        sites: Sequence[str] | None = None,
        reuse: bool = True,
    ) -> None:
        self.model = model
        self.samples = list(samples)
        self.metric = metric
        self.batch_size = batch_size
        self.masks_per_pass = max(1, masks_per_pass if metric == "ppl" else 1)
        self.max_new_tokens = max_new_tokens
        self.objective = objective
        self.backend = backend
        self.work = work or Work()
        # The encoded batches and, before the earliest of ``sites`` (every site a set may
        # mask), the forward pass, computed once for all passes.
        self.shared = SharedWork(
            model, self.samples, batch_size, sites or (), replay=reuse and bool(sites)
        )
        self.calls = 0
        # A group's result depends on the samples it was measured on, and on nothing else that
        # the run's manifest does not already pin.
        self._data = data_fingerprint(self.samples)
        job = self.work.job
        desc = "masked evaluations" + (
            f" (rank {job.rank} of {job.world})" if job.distributed else ""
        )
        self.bar = tqdm(desc=desc, unit="mask", disable=not progress, position=job.rank)

    def close(self) -> None:
        self.bar.close()

    def __call__(self, sets: Sequence[NeuronSet]) -> list[float]:
        """The metric of each set, ``masks_per_pass`` sets per forward pass."""
        step = self.masks_per_pass
        groups = [list(sets[start : start + step]) for start in range(0, len(sets), step)]
        return [value for values in self.groups(groups) for value in values]

    def groups(self, groups: Sequence[Sequence[NeuronSet]]) -> list[list[float]]:
        """The metric of each set of each group, one forward pass per group. Groups may come
        from several orderings at once: the more groups per call, the more ranks can share."""
        keys = [
            content_key("eval", self.metric, self._data, [n.neurons for n in group])
            for group in groups
        ]
        # The same group asked twice in one call (two orderings that agree on a prefix) runs
        # once.
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        unique = sorted(first.values())
        sizes = [len(groups[i]) for i in unique]

        def compute(indices: list[int]):
            for j in indices:
                group = list(groups[unique[j]])
                values = self._ppl(group) if self.metric == "ppl" else [self._gen_ppl(group[0])]
                self.bar.update(len(group))
                yield j, torch.tensor(values, dtype=torch.float64)

        results = self.work.map([keys[i] for i in unique], sizes, compute)
        by_key = {keys[i]: r.tolist() for i, r in zip(unique, results, strict=True)}
        self.calls += sum(len(group) for group in groups)
        return [by_key[key] for key in keys]

    def _ppl(self, group: list[NeuronSet]) -> list[float]:
        for neurons in group:
            for site, _ in neurons:
                if self.shared.replay and site not in self.shared.sites:
                    raise ValueError(f"site {site} is not among the sites of this evaluator")
        self.shared.prepare()
        with masked(self.model, group, backend=self.backend):
            results = evaluate_batches(
                self.model,
                self.shared.batches(),
                self.objective,
                masks=len(group),
                around=self.shared.around,
            )
        return [r.ppl for r in results]

    def _gen_ppl(self, neurons: NeuronSet) -> float:
        with masked(self.model, [neurons], backend=self.backend):
            answers = generate_answers(
                self.model, self.samples, self.max_new_tokens, self.batch_size
            )
        produced = [s.with_target(a) for s, a in zip(self.samples, answers, strict=True)]
        return evaluate(self.model, produced, self.batch_size, self.objective)[0].ppl
