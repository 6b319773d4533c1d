"""Recent per-adapter latency, exact percentiles over a sliding window, for `/dashboard`.

Prometheus histograms answer "p95 over an hour" approximately, from buckets; the dashboard
wants exact figures for the last few minutes without a Prometheus server, so the gateway
keeps the recent requests themselves (a few numbers each, bounded per adapter).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.telemetry.latency import percentile
from gateway.telemetry.records import AdapterType, RequestRecord

DEFAULT_WINDOW_S = 300.0
MAX_SAMPLES_PER_ADAPTER = 10_000


@dataclass(frozen=True)
class Sample:
    at: float
    ok: bool
    ttft: float | None
    tpot: float | None


class LatencyWindow:
    """Samples of the last `window_s` seconds per adapter (all tenants together)."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._since = clock()
        self._samples: dict[str, deque[Sample]] = {}
        self._types: dict[str, AdapterType] = {}

    def add(self, record: RequestRecord) -> None:
        samples = self._samples.setdefault(record.adapter,
                                           deque(maxlen=MAX_SAMPLES_PER_ADAPTER))
        samples.append(Sample(self._clock(), record.ok, record.ttft_seconds,
                              record.tpot_seconds))
        self._types[record.adapter] = record.adapter_type

    def summary(self) -> dict:
        """Per adapter (base first): request rate, p50/p95 TTFT and time per output token in
        milliseconds, and their p50 overhead over the base model's in percent (None where
        either side has no sample)."""
        now = self._clock()
        span = max(min(self.window_s, now - self._since), 1e-9)
        rows = [self._row(name, self._recent(name, now), span) for name in self._names()]
        base = next((row for row in rows if row["type"] == AdapterType.BASE), None)
        for row in rows:
            row["ttft_overhead_pct"] = _overhead(row, base, "ttft_p50_ms")
            row["tpot_overhead_pct"] = _overhead(row, base, "tpot_p50_ms")
        return {"window_seconds": self.window_s, "adapters": rows}

    def _names(self) -> list[str]:
        return sorted(self._samples,
                      key=lambda name: (self._types[name] != AdapterType.BASE, name))

    def _recent(self, name: str, now: float) -> list[Sample]:
        samples = self._samples[name]
        while samples and samples[0].at < now - self.window_s:
            samples.popleft()
        return list(samples)

    def _row(self, name: str, samples: list[Sample], span_s: float) -> dict:
        """`span_s`: the window, or the time since the gateway started if that is shorter."""
        ttfts = [s.ttft for s in samples if s.ok and s.ttft is not None]
        tpots = [s.tpot for s in samples if s.ok and s.tpot is not None]
        return {
            "adapter": name,
            "type": self._types[name],
            "requests": len(samples),
            "errors": sum(not s.ok for s in samples),
            "rate_per_s": len(samples) / span_s,
            "ttft_p50_ms": _ms(percentile(ttfts, 50)),
            "ttft_p95_ms": _ms(percentile(ttfts, 95)),
            "tpot_p50_ms": _ms(percentile(tpots, 50)),
            "tpot_p95_ms": _ms(percentile(tpots, 95)),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _overhead(row: dict, base: dict | None, key: str) -> float | None:
    if base is None or row[key] is None or not base[key]:
        return None
    return (row[key] / base[key] - 1) * 100
