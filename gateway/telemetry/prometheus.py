"""The gateway's Prometheus metrics, in a registry of its own (one per app).

Labels carry only bounded values the gateway owns: tenant names from the config, adapter
names that an admin registered (or "base"), the adapter type, HTTP status codes and backend
URLs from the config. A client's model string never becomes a label: requests naming an
unknown model are refused before they are counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.telemetry.records import RequestRecord

PREFIX = "dora_gateway"
REQUEST_LABELS = ("tenant", "adapter", "adapter_type")
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ADAPTER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    """Request histograms and counters, adapter compile/load times, and gauges read at
    scrape time (in-flight requests, backend health, registered adapters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = self._histogram("time_to_first_token_seconds",
                                    "Time from request accepted to first generated token "
                                    "relayed (streams)", TTFT_BUCKETS)
        self.tpot = self._histogram("time_per_output_token_seconds",
                                    "Per request: time after the first token divided by "
                                    "the further tokens (streams)", TPOT_BUCKETS)
        self.e2e = self._histogram("request_duration_seconds",
                                   "Time from request accepted to answer complete "
                                   "(successful requests)", E2E_BUCKETS)
        self.upstream = self._histogram("upstream_duration_seconds",
                                        "Time spent in the vLLM call (successful requests)",
                                        E2E_BUCKETS)
        self.requests = Counter(f"{PREFIX}_requests", "Completion requests by final status",
                                (*REQUEST_LABELS, "status"), registry=self.registry)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens (vLLM usage)",
                                     REQUEST_LABELS, registry=self.registry)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens",
                                         "Generated tokens (vLLM usage)", REQUEST_LABELS,
                                         registry=self.registry)
        self.adapter_compile = Histogram(f"{PREFIX}_adapter_compile_seconds",
                                         "Validating and compiling an added adapter "
                                         "(a store hit is fast)", ("adapter_type",),
                                         buckets=ADAPTER_BUCKETS, registry=self.registry)
        self.adapter_load = Histogram(f"{PREFIX}_adapter_load_seconds",
                                      "Loading a compiled adapter into a vLLM backend",
                                      ("adapter_type",), buckets=ADAPTER_BUCKETS,
                                      registry=self.registry)
        self.limit_refusals = Counter(f"{PREFIX}_rate_limited_requests",
                                      "Requests refused by a tenant's limit (429)",
                                      ("tenant", "limit"), registry=self.registry)
        self.adapter_refusals = Counter(f"{PREFIX}_adapter_load_refusals",
                                        "Adapter loads a vLLM backend refused (the adapter "
                                        "is then unservable)", ("adapter", "adapter_type"),
                                        registry=self.registry)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(f"{PREFIX}_{name}", documentation, REQUEST_LABELS, buckets=buckets,
                         registry=self.registry)

    def observe(self, record: RequestRecord) -> None:
        labels = (record.tenant, record.adapter, record.adapter_type)
        self.requests.labels(*labels, str(record.status)).inc()
        if not record.ok:
            return
        self.e2e.labels(*labels).observe(record.e2e_seconds)
        self.upstream.labels(*labels).observe(record.upstream_seconds)
        if record.ttft_seconds is not None:
            self.ttft.labels(*labels).observe(record.ttft_seconds)
        if record.tpot_seconds is not None:
            self.tpot.labels(*labels).observe(record.tpot_seconds)
        if record.prompt_tokens is not None:
            self.prompt_tokens.labels(*labels).inc(record.prompt_tokens)
        if record.completion_tokens is not None:
            self.completion_tokens.labels(*labels).inc(record.completion_tokens)

    def add_gauges(self, read: Callable[[], Iterable[Metric]]) -> None:
        """Gauges computed from live state at each scrape."""
        self.registry.register(_ScrapeTimeCollector(read))


def gauge(name: str, documentation: str, labels: tuple[str, ...],
          values: Iterable[tuple[tuple[str, ...], float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", documentation, labels=labels)
    for label_values, value in values:
        family.add_metric(label_values, value)
    return family


class _ScrapeTimeCollector(Collector):
    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        return self._read()
