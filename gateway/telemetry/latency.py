"""The one percentile definition the gateway's figures use (dashboard, bench, benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank: always a value that was observed, so p95 of few samples is the slowest
    rather than an interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]
