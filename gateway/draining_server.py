"""uvicorn, stopped by draining: what Kubernetes' SIGTERM (or Ctrl-C) asks of a server.

On the first SIGTERM or SIGINT the gateway keeps listening but closes its `ShutdownGate`:
new requests get 503 `shutting_down` with `Retry-After` (and `/health` says 503, so load
balancers stop sending), while requests in flight, streams included, run on. Once none is in
flight, or `grace_s` has passed, uvicorn stops as usual: what still waits for vLLM is cut (a
stream ends with a `shutting_down` error event, a plain request is answered 503
`shutting_down`) and anything else still running is cancelled; either way the upstream is
closed, so vLLM aborts its generation. `serve` then stops the local vLLM. A second SIGINT
stops at once.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from gateway.api.shutdown_gate import ShutdownGate

# What uvicorn still waits, after the drain, for answers to finish (cut requests to send
# their last event or their 503) before cancelling them.
FINAL_WAIT_S = 1

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gate: ShutdownGate, grace_s: float) -> None:
        config.timeout_graceful_shutdown = FINAL_WAIT_S
        super().__init__(config)
        self._gate = gate
        self._grace_s = grace_s
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_deadline is not None or self.should_exit:
            super().handle_exit(sig, frame)  # asked again: stop now
            return
        log.info("draining: %d request(s) in flight, new ones refused; stopping within %ss",
                 self._gate.in_flight, self._grace_s)
        self._gate.close()
        self._drain_deadline = time.monotonic() + self._grace_s

    async def on_tick(self, counter: int) -> bool:
        if self._drain_deadline is not None and not self.should_exit:
            if self._gate.idle:
                log.info("drained: no request in flight")
                self.should_exit = True
            elif time.monotonic() >= self._drain_deadline:
                log.warning("the grace period ended with %d request(s) in flight; stopping",
                            self._gate.in_flight)
                self._gate.cut_waits()
                self.should_exit = True
        return await super().on_tick(counter)
