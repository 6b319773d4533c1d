"""Timing one completion request as it passes through the gateway.

The routes and the proxy call the meter at each milestone; `finish` (first call wins) turns
the readings into a `RequestRecord` and hands it to the sink (Prometheus, the dashboard's
window and the usage ledger) and to the request's own observers (its token charge, settled
with the real usage). Every path out of a request, error or disconnect included, ends in
`finish`.
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
        self._text_chunks = 0
        self._observers: list[Callable[[RequestRecord], None]] = []
        self._finished = False

    def on_finish(self, observer: Callable[[RequestRecord], None]) -> None:
        """Call `observer` with this request's record when it finishes."""
        self._observers.append(observer)

    def upstream_started(self) -> None:
        self._upstream_started = self._clock()

    def upstream_finished(self) -> None:
        if self._upstream_finished is None:
            self._upstream_finished = self._clock()

    def text_relayed(self) -> None:
        """A generated-text chunk went to the client (`telemetry.latency`'s definition)."""
        now = self._clock()
        self._text_chunks += 1
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
        record = RequestRecord(
            tenant=tenant, adapter=adapter, adapter_type=adapter_type,
            started=self._started, finished=finished,
            upstream_seconds=self._upstream_seconds(), status=status,
            first_token=self._first_token, last_token=self._last_token,
            prompt_tokens=_count(self._usage.get("prompt_tokens")),
            completion_tokens=_count(self._usage.get("completion_tokens")),
            text_chunks=self._text_chunks)
        self._sink(record)
        for observer in self._observers:
            observer(record)

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
