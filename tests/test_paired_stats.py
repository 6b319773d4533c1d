"""The benchmarks' confidence interval for a median, checked by what it promises: over many
samples from a skewed, heavy-tailed distribution, it covers the true median at least 95% of
the time, and not far more (an interval that always covers would be useless)."""

from __future__ import annotations

import random

import pytest

from benchmarks.paired_stats import median_with_interval


@pytest.mark.parametrize("n", [6, 12, 25, 60])
def test_the_interval_covers_the_true_median_at_its_confidence(n):
    rng = random.Random(n)
    trials = 4000
    covered = 0
    for _ in range(trials):
        sample = [rng.lognormvariate(0, 1) for _ in range(n)]  # true median exp(0) = 1
        median, low, high = median_with_interval(sample)
        assert low <= median <= high
        covered += low <= 1 <= high
    assert 0.94 <= covered / trials <= 0.995


def test_too_few_samples_give_the_whole_range():
    assert median_with_interval([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
