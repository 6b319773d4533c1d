"""One place where finished requests go: Prometheus metrics and the dashboard's window.

It also hooks the gateway's live state into Prometheus as gauges read at scrape time
(requests in flight per tenant, backend health, registered adapters per type) and times
adapter compiles and loads, and counts the loads a backend refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import Metric

from gateway.names import BASE_MODEL
from gateway.registry import AdapterEntry, AdapterRegistry
from gateway.telemetry.meter import RequestMeter
from gateway.telemetry.prometheus import GatewayMetrics, gauge
from gateway.telemetry.records import BASE, DORA, LORA, RequestRecord
from gateway.telemetry.window import LatencyWindow
from gateway.upstream.lora_loader import Refusal
from gateway.upstream.pool import BackendPool


def adapter_type(entry: AdapterEntry | None) -> str:
    if entry is None:
        return BASE
    return DORA if entry.is_dora else LORA


class Telemetry:
    def __init__(self, window_s: float) -> None:
        self.metrics = GatewayMetrics()
        self.window = LatencyWindow(window_s)

    def record(self, record: RequestRecord) -> None:
        self.metrics.observe(record)
        self.window.add(record)

    def meter(self, tenant: str, entry: AdapterEntry | None) -> RequestMeter:
        name = entry.name if entry else BASE_MODEL
        return RequestMeter(tenant, name, adapter_type(entry), self.record)

    def adapter_compiled(self, entry: AdapterEntry) -> None:
        self.metrics.adapter_compile.labels(adapter_type(entry)).observe(entry.compile_seconds)

    def adapter_loaded(self, entry: AdapterEntry, seconds: float) -> None:
        self.metrics.adapter_load.labels(adapter_type(entry)).observe(seconds)

    def adapter_refused(self, entry: AdapterEntry, refusal: Refusal) -> None:
        self.metrics.adapter_refusals.labels(entry.name, adapter_type(entry)).inc()

    def watch(self, in_flight: Callable[[], dict[str, int]], pool: BackendPool,
              registry: AdapterRegistry) -> None:
        """Expose in-flight requests, backend health and adapter counts as gauges."""

        def read() -> Iterable[Metric]:
            yield gauge("requests_in_flight", "Completion requests being answered",
                        ("tenant",), (((name,), count) for name, count in in_flight().items()))
            yield gauge("backend_up", "1 while the vLLM backend passes health checks",
                        ("backend",), (((backend.url,), float(backend.healthy))
                                       for backend in pool.backends))
            counts = dict.fromkeys((LORA, DORA), 0)
            for entry in registry.entries():
                counts[adapter_type(entry)] += 1
            yield gauge("adapters", "Adapters registered, by type", ("adapter_type",),
                        (((kind,), count) for kind, count in counts.items()))

        self.metrics.add_gauges(read)
