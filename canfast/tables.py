"""Plain-text tables for terminal summaries: the first column left-aligned, numbers right."""

from __future__ import annotations

import math
from collections.abc import Sequence


def fmt(value: object) -> str:
    """A cell: ``-`` for None, four significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """``headers`` over a dashed rule over ``rows``, columns padded to their widest cell."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    # The first column is text and reads best left-aligned; numbers line up on the right.
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
