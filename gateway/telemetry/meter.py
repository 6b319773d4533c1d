"""Timing one completion request as it passes through the gateway.

The routes and the proxy call the meter at each milestone; `finish` (first call wins) turns
the readings into a `RequestRecord` and hands it to the sink (Prometheus and the dashboard's
window). Every path out of a request, error or disconnect included, ends in `finish`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from gateway.errors import GatewayError
from gateway.telemetry.records import AdapterType, RequestRecord

Clock = Callable[[], float]


class RequestMeter:
    def __init__(self, tenant: str, adapter: str, adapter_type: AdapterType,
                 sink: Callable[[RequestRecord], None], clock: Clock = time.perf_counter) -> None:
        self._labels = (tenant, adapter, adapter_type)
        self._sink = sink
        self._clock = clock
        self._started = clock()
        self._upstream_started: float | None = None
        self._upstream_finished: float | None = None
        self._first_token: float | None = None
        self._last_token: float | None = None
        self._usage: dict = {}
        self._finished = False

    def upstream_started(self) -> None:
        self._upstream_started = self._clock()

    def upstream_finished(self) -> None:
        if self._upstream_finished is None:
            self._upstream_finished = self._clock()

    def text_relayed(self) -> None:
        """A generated-text chunk went to the client (`telemetry.latency`'s definition)."""
        now = self._clock()
        if self._first_token is None:
            self._first_token = now
        self._last_token = now

    def usage(self, usage: object) -> None:
        """vLLM's `usage` object (prompt_tokens, completion_tokens); anything else is ignored."""
        if isinstance(usage, dict):
            self._usage = usage

    def finish(self, status: int) -> None:
        if self._finished:
            return
        self._finished = True
        finished = self._clock()
        self.upstream_finished()
        tenant, adapter, adapter_type = self._labels
        self._sink(RequestRecord(
            tenant=tenant, adapter=adapter, adapter_type=adapter_type,
            started=self._started, finished=finished,
            upstream_seconds=self._upstream_seconds(), status=status,
            first_token=self._first_token, last_token=self._last_token,
            prompt_tokens=_count(self._usage.get("prompt_tokens")),
            completion_tokens=_count(self._usage.get("completion_tokens"))))

    @contextmanager
    def failures(self) -> Iterator[None]:
        """Finish with the status of a gateway error (500 for anything else) raised inside."""
        try:
            yield
        except GatewayError as exc:
            self.finish(exc.status)
            raise
        except Exception:
            self.finish(500)
            raise

    def _upstream_seconds(self) -> float:
        if self._upstream_started is None or self._upstream_finished is None:
            return 0.0
        return max(0.0, self._upstream_finished - self._upstream_started)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
