"""Wall-clock timings of the stages of a run, kept by name in seconds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Timings(dict[str, float]):
    """Seconds per stage, keyed ``"<stage>_s"``; a plain dict in JSON."""

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        """Time the ``with`` block as ``stage``; a block that raises is timed too."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self[f"{stage}_s"] = time.perf_counter() - start
