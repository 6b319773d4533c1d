"""One place where finished requests go: Prometheus metrics and the dashboard's window.

It also takes in the engines' own account of adapter costs (`engine_cost`), hooks the
gateway's live state into Prometheus as gauges read at scrape time
(requests in flight per tenant, backend health, registered adapters per type), times adapter
compiles and loads, and counts the loads a backend refused. It sees adapters only through
the `Adapter` protocol and live state through callables, so telemetry/ imports neither the
registry nor upstream/.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from prometheus_client.core import Metric

from gateway.names import BASE_MODEL
from gateway.telemetry.engine_cost import EngineCost, engine_counters
from gateway.telemetry.meter import RequestMeter
from gateway.telemetry.prometheus import GatewayMetrics, gauge
from gateway.telemetry.records import AdapterType, RequestRecord
from gateway.telemetry.window import LatencyWindow

log = logging.getLogger(__name__)


class Adapter(Protocol):
    """A registered adapter as telemetry sees it (`registry.AdapterEntry`)."""

    @property
    def name(self) -> str: ...

    @property
    def is_dora(self) -> bool: ...

    @property
    def compile_seconds(self) -> float: ...

    @property
    def internal_name(self) -> str: ...


def adapter_type(adapter: Adapter | None) -> AdapterType:
    if adapter is None:
        return AdapterType.BASE
    return AdapterType.DORA if adapter.is_dora else AdapterType.LORA


class Telemetry:
    def __init__(self, window_s: float) -> None:
        self.metrics = GatewayMetrics()
        self.window = LatencyWindow(window_s)
        self.engine_cost = EngineCost(window_s, dict)  # knows the adapters once `watch`ed
        self._sinks: list[Callable[[RequestRecord], None]] = []

    def record(self, record: RequestRecord) -> None:
        self.metrics.observe(record)
        self.window.add(record)
        for sink in self._sinks:
            sink(record)

    def add_sink(self, sink: Callable[[RequestRecord], None]) -> None:
        """Also hand every finished request to `sink` (the usage ledger)."""
        self._sinks.append(sink)

    def meter(self, tenant: str, adapter: Adapter | None) -> RequestMeter:
        """A meter for one request of `tenant` for `adapter` (None: the base model)."""
        name = adapter.name if adapter else BASE_MODEL
        return RequestMeter(tenant, name, adapter_type(adapter), self.record)

    def engine_metrics_read(self, backend: str, metrics_text: str) -> None:
        """Take in a backend's `/metrics` text: the engine's account of adapter costs (a text
        that does not parse is logged and left out)."""
        try:
            counters = engine_counters(metrics_text)
        except ValueError as exc:
            log.warning("unreadable engine metrics from %s: %s", backend, exc)
            return
        self.engine_cost.update(backend, counters)

    def adapter_compiled(self, adapter: Adapter) -> None:
        self.metrics.adapter_compile.labels(adapter_type(adapter)).observe(
            adapter.compile_seconds)

    def adapter_loaded(self, adapter: Adapter, seconds: float) -> None:
        self.metrics.adapter_load.labels(adapter_type(adapter)).observe(seconds)

    def adapter_refused(self, adapter: Adapter, refusal: object) -> None:
        self.metrics.adapter_refusals.labels(adapter.name, adapter_type(adapter)).inc()

    def watch(self, in_flight: Callable[[], Mapping[str, int]],
              backends_up: Callable[[], Mapping[str, bool]],
              adapters: Callable[[], Iterable[Adapter]]) -> None:
        """Expose requests in flight per tenant, health per backend URL and registered
        adapters per type as gauges, and the engines' cost figures of registered adapters."""
        self.engine_cost = EngineCost(self.window.window_s,
                                      lambda: {a.internal_name: a.name for a in adapters()})

        def read() -> Iterable[Metric]:
            yield gauge("requests_in_flight", "Completion requests being answered",
                        ("tenant",), (((name,), count) for name, count in in_flight().items()))
            yield gauge("backend_up", "1 while the vLLM backend passes health checks",
                        ("backend",), (((url,), float(up)) for url, up in backends_up().items()))
            counts = dict.fromkeys((AdapterType.LORA, AdapterType.DORA), 0)
            for adapter in adapters():
                counts[adapter_type(adapter)] += 1
            yield gauge("adapters", "Adapters registered, by type", ("adapter_type",),
                        (((kind,), count) for kind, count in counts.items()))

        self.metrics.add_gauges(read)
        self.metrics.add_gauges(lambda: self.engine_cost.collect())
