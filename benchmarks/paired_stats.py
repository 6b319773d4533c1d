"""A confidence interval for a median that assumes nothing about the distribution.

Benchmark ratios on a shared VM have heavy tails (a preempted step is 10x a normal one), so
the interval comes from order statistics rather than a normal approximation: the number of
samples below the true median is Binomial(n, 1/2), whatever the distribution.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def binomial_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def median_with_interval(values: Sequence[float],
                         confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high), where [low, high] = [x_(k), x_(n+1-k)] of the sorted values (1-based)
    with the largest k whose coverage is still at least `confidence`; for n < 6 no such k
    exists at 95%, and the interval is the whole range."""
    ordered = sorted(values)
    n = len(ordered)
    k = 0
    while k + 1 <= n // 2 and 1 - 2 * binomial_cdf(k, n) >= confidence:
        k += 1
    low, high = (ordered[k - 1], ordered[n - k]) if k else (ordered[0], ordered[-1])
    return statistics.median(ordered), low, high
