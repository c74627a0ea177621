"""Chunks of a long run: each computed once, kept as it finishes, and shared across ranks.

A sweep or a scan hands its work out as chunks (a group of masked evaluations, a block of
scanned neurons) through :meth:`Work.map`. Each chunk has a key that names its content and a
result, a 1-D float64 tensor of known length.

- **Kept.** A finished chunk is written at once, atomically, into the journal of the run being
  written (``chunks/KEY.safetensors``). A resumed run reads it back instead of computing it, so
  its files are those of a run that was never interrupted.
- **Shared.** Under torchrun the chunks not yet in the journal are dealt round-robin to the
  ranks; each computes its own, and one exact all-reduce gives every rank every result, so that
  all ranks take the same next step. Which rank computed a chunk changes no number: a chunk's
  result depends only on its content.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from canfast.distributed import SINGLE, Job, sum_exact
from canfast.io import load_tensors, save_tensors

CHUNKS_DIR = "chunks"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.@:+-]{1,200}$")

# compute(indices) yields (index, result) for each chunk of ``indices`` as it finishes.
Compute = Callable[[list[int]], Iterable[tuple[int, Tensor]]]


class Work:
    """Where the chunks of one run are computed and kept.

    ``journal``: the directory finished chunks go to (None: kept nowhere, as for a run that is
    not written to disk). ``job``: this process's rank in a torchrun job.
    """

    def __init__(self, journal: Path | None = None, job: Job = SINGLE) -> None:
        self.journal = Path(journal) if journal is not None else None
        self.job = job
        self.computed = 0  # chunks this process computed
        self.reused = 0  # chunks read back from the journal
        if self.journal is not None:
            self.journal.mkdir(parents=True, exist_ok=True)

    def map(self, keys: Sequence[str], sizes: Sequence[int], compute: Compute) -> list[Tensor]:
        """The result of every chunk, in the order of ``keys``: from the journal when it is
        there, else computed by the rank it falls to and exchanged (a collective under torchrun:
        every rank calls ``map`` with the same keys)."""
        if len(set(keys)) != len(keys):
            raise ValueError("chunk keys must be unique within one map")
        results: list[Tensor | None] = [self._read(key, size) for key, size in zip(keys, sizes)]
        missing = [i for i, r in enumerate(results) if r is None]
        # Rank 0's view of the journal decides what is done, so that every rank deals the same.
        if self.job.distributed:
            seen = torch.zeros(len(keys), dtype=torch.float64)
            if self.job.leader:
                seen[[i for i, r in enumerate(results) if r is not None]] = 1.0
            seen = sum_exact(seen, self.job)
            missing = [i for i in range(len(keys)) if seen[i] == 0]
        mine = missing[self.job.rank :: self.job.world]
        for index, value in compute(mine):
            value = value.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
            if value.numel() != sizes[index]:
                raise RuntimeError(
                    f"chunk {keys[index]}: {value.numel()} values, expected {sizes[index]}"
                )
            self._write(keys[index], value)
            results[index] = value
            self.computed += 1
        self.reused += len(keys) - len(missing)
        if not self.job.distributed:
            return [r for r in results]  # type: ignore[misc]
        return self._exchange(results, sizes, set(missing), set(mine))

    def _exchange(self, results, sizes, missing: set[int], mine: set[int]) -> list[Tensor]:
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        flat = torch.zeros(offsets[-1], dtype=torch.float64)
        for i, value in enumerate(results):
            owned = i in mine or (i not in missing and self.job.leader)
            if owned and value is not None:
                flat[offsets[i] : offsets[i + 1]] = value
        flat = sum_exact(flat, self.job)
        return [flat[offsets[i] : offsets[i + 1]].clone() for i in range(len(sizes))]

    # ----- the journal -------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        if not _SAFE_KEY.match(key):
            raise ValueError(f"chunk key {key!r} is not a safe file name")
        assert self.journal is not None
        return self.journal / f"{key}.safetensors"

    def _read(self, key: str, size: int) -> Tensor | None:
        if self.journal is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        tensors, meta = load_tensors(path)
        value = tensors.get("values")
        if meta.get("key") != key or value is None or value.numel() != size:
            return None  # not this chunk (a stray file): computed again
        return value.to(torch.float64)

    def _write(self, key: str, value: Tensor) -> None:
        if self.journal is None:
            return
        save_tensors(self._path(key), {"values": value.contiguous()}, {"key": key})


def content_key(prefix: str, *parts: object) -> str:
    """A chunk key that names its content: ``PREFIX-<sha1 of the parts>``."""
    digest = hashlib.sha1(repr(parts).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}"
