"""The dashboard's window: nearest-rank percentiles, expiry, rate and overhead against base."""

from __future__ import annotations

import pytest

from gateway.telemetry.latency import percentile
from gateway.telemetry.records import RequestRecord
from gateway.telemetry.window import LatencyWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(adapter: str, ttft: float, tpot: float, *, tokens: int = 11, status: int = 200,
           adapter_type: str = "dora") -> RequestRecord:
    """A streamed request: first token after `ttft`, then `tokens - 1` more at `tpot` each."""
    return RequestRecord(tenant="t", adapter=adapter, adapter_type=adapter_type, started=0.0,
                         first_token=ttft, last_token=ttft + tpot * (tokens - 1),
                         finished=ttft + tpot * (tokens - 1),
                         upstream_seconds=0.0, status=status, completion_tokens=tokens)


def test_percentile_is_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert [percentile(values, q) for q in (1, 20, 50, 95, 100)] == [1.0, 1.0, 3.0, 5.0, 5.0]
    assert percentile([], 50) is None


def test_summary_per_adapter_with_overhead_against_base():
    clock = Clock()
    window = LatencyWindow(60, clock=clock)
    for tpot in (0.010, 0.012, 0.011):
        window.add(record("base", 0.1, tpot, adapter_type="base"))
    for tpot in (0.0121, 0.0110, 0.0133):
        window.add(record("caps", 0.2, tpot))
    clock.now += 30
    rows = {row["adapter"]: row for row in window.summary()["adapters"]}
    assert rows["base"]["tpot_p50_ms"] == pytest.approx(11.0)
    assert rows["caps"]["tpot_p50_ms"] == pytest.approx(12.1)
    assert rows["caps"]["tpot_p95_ms"] == pytest.approx(13.3)
    assert rows["caps"]["tpot_overhead_pct"] == pytest.approx(10.0)
    assert rows["caps"]["ttft_overhead_pct"] == pytest.approx(100.0)
    assert rows["caps"]["rate_per_s"] == pytest.approx(3 / 30)


def test_old_samples_leave_the_window_and_failures_count_only_as_errors():
    clock = Clock()
    window = LatencyWindow(60, clock=clock)
    window.add(record("caps", 0.5, 0.05))
    clock.now += 61
    window.add(record("caps", 0.1, 0.01, status=502))
    (row,) = window.summary()["adapters"]
    assert (row["requests"], row["errors"]) == (1, 1)
    assert row["tpot_p50_ms"] is None and row["tpot_overhead_pct"] is None


def test_no_base_traffic_means_no_overhead_figure():
    window = LatencyWindow(60, clock=Clock())
    window.add(record("caps", 0.1, 0.01))
    (row,) = window.summary()["adapters"]
    assert row["tpot_p50_ms"] == pytest.approx(10.0) and row["tpot_overhead_pct"] is None
