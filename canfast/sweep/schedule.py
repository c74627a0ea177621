"""The k grid of a sweep: every k up to 16, then geometric steps of 1.25x."""

from __future__ import annotations

import math


def default_schedule(n_neurons: int, dense_until: int = 16, growth: float = 1.25) -> list[int]:
    ks = list(range(1, min(dense_until, n_neurons) + 1))
    k = float(ks[-1]) if ks else 1.0
    while ks and ks[-1] < n_neurons:
        k *= growth
        nxt = min(max(math.ceil(k), ks[-1] + 1), n_neurons)
        ks.append(nxt)
        k = float(nxt)
    return ks


def parse_schedule(text: str, n_neurons: int) -> list[int]:
    """``"1,2,4,8"`` or ``"1:64"`` (every k) or ``"1:64:2"`` (a step)."""
    from canfast.errors import BadInput

    ks: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if ":" in part:
                bounds = [int(x) for x in part.split(":")]
                start, stop = bounds[0], bounds[1]
                step = bounds[2] if len(bounds) > 2 else 1
                # Bounded by the neuron count before it is built: 1:10**12 costs nothing.
                ks.extend(range(max(start, 1), min(stop, n_neurons) + 1, step))
            elif part:
                ks.append(int(part))
    except ValueError:
        raise BadInput(f"bad --schedule {text!r}; use e.g. 1,2,4,8 or 1:64 or 1:64:2") from None
    ks = sorted({k for k in ks if 0 < k <= n_neurons})
    if not ks:
        raise BadInput(f"--schedule {text!r} has no k between 1 and {n_neurons}")
    return ks
