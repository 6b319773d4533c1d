"""Keeping the local engine (the vLLM server this gateway started) running.

vLLM can die under the gateway (the OOM killer, a crash in a kernel). When its process exits,
the backend leaves the rotation at once: new requests get 503, streams on it have already
ended with an error event, and marking it down makes the adapter loader forget what was loaded
there, as a new server has none of it. A new server is started on the same port; it rejoins
the rotation once healthy, with every adapter loaded again if loading is eager (else on first
use). A server that fails to start is retried with a growing delay, so a persistent fault does
not spin the CPU.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from gateway.upstream.health_checks import AdapterSet, load_eagerly
from gateway.upstream.pool import BackendPool

POLL_INTERVAL_S = 1.0
READY_TIMEOUT_S = 300.0
MAX_RETRY_DELAY_S = 60.0

log = logging.getLogger(__name__)


class SupervisedEngine(Protocol):
    """A restartable server process, as `EngineProcess` is (tests inject fakes)."""

    @property
    def base_url(self) -> str: ...

    def start(self) -> None: ...

    def exited(self) -> bool: ...

    def stop(self) -> None: ...


class EngineSupervisor:
    """Restarts `engine` whenever it exits; it is the backend at `engine.base_url` in `pool`."""

    def __init__(self, engine: SupervisedEngine, pool: BackendPool, adapters: AdapterSet, *,
                 eager: bool, poll_interval_s: float = POLL_INTERVAL_S,
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self._engine = engine
        self._pool = pool
        self._backend = pool.by_url(engine.base_url)
        self._adapters = adapters
        self._eager = eager
        self._poll_interval_s = poll_interval_s
        self._ready_timeout_s = ready_timeout_s
        self.restarts = 0

    async def run(self) -> None:
        """Watch the engine and restart it whenever it exits, until cancelled; an unexpected
        failure is logged and the next round tries again, as the gateway is useless without
        its engine."""
        while True:
            await asyncio.sleep(self._poll_interval_s)
            if not self._engine.exited():
                continue
            try:
                await self.restart()
            except Exception:
                log.exception("restarting the vLLM server at %s failed", self._backend.url)

    async def restart(self) -> None:
        url = self._backend.url
        log.error("the vLLM server at %s exited; restarting it", url)
        self._pool.mark_down(self._backend)
        delay = self._poll_interval_s
        while True:
            # Whatever the old server left running (its engine core) must go first.
            await asyncio.to_thread(self._engine.stop)
            self._engine.start()
            if await self._became_healthy():
                break
            log.error("the vLLM server at %s did not start; retrying in %.0fs", url, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, MAX_RETRY_DELAY_S)
        self.restarts += 1
        if self._eager:
            await load_eagerly(self._adapters, [self._backend])
        log.info("the vLLM server at %s is back", url)

    async def _became_healthy(self) -> bool:
        """Poll health (which marks the backend up) until it answers, the process exits, or
        the start-up time runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout_s
        while loop.time() < deadline and not self._engine.exited():
            if await self._pool.check(self._backend):
                return True
            await asyncio.sleep(self._poll_interval_s)
        return False
