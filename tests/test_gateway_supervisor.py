"""Supervising the locally started vLLM: a dead server is replaced and its adapters reloaded.

The engine is a fake process over the fake vLLM, so every step of a restart (down, 503,
failed start, back, reload) is observable; `test_stop_kills_what_a_dead_server_left` runs real
processes.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import psutil
import pytest

from gateway.engine.process import EngineProcess, EngineSettings
from gateway.engine.supervisor import EngineSupervisor
from tests.gateway_fakes import (
    GLOBEX_KEY,
    FakeVllm,
    make_gateway,
    wait_until,
)

pytestmark = pytest.mark.anyio
LOAD = "/v1/load_lora_adapter"


@dataclass
class FakeEngine:
    """A server process over `vllm`: `crash()` kills it; a start serves once `vllm.down` is
    cleared, or dies at once while `failing_starts` lasts."""

    vllm: FakeVllm
    failing_starts: int = 0
    running: bool = True
    starts: int = 0
    stops: int = 0

    @property
    def base_url(self) -> str:
        return self.vllm.url

    def start(self) -> None:
        self.starts += 1
        if self.failing_starts:
            self.failing_starts -= 1
            return
        self.running = True

    def exited(self) -> bool:
        return not self.running

    def stop(self) -> None:
        self.stops += 1

    def crash(self) -> None:
        self.running = False
        self.vllm.down = True
        self.vllm.loaded.clear()


async def test_a_dead_engine_is_restarted_and_its_adapters_reloaded(tmp_path, llama_base, demo):
    gateway = await make_gateway(tmp_path, llama_base, demo, tmp_path / "store")
    engine = FakeEngine(gateway.vllm, failing_starts=1)
    supervisor = EngineSupervisor(engine, gateway.pool, gateway.registry, eager=False,
                                  poll_interval_s=0.01)
    request = {"model": "caps", "prompt": "x", "max_tokens": 4}
    lifespan = gateway.app.router.lifespan_context(gateway.app)
    async with lifespan, gateway.client(GLOBEX_KEY) as client:
        watching = asyncio.create_task(supervisor.run())
        assert (await client.post("/v1/completions", json=request)).status_code == 200
        engine.crash()
        await wait_until(lambda: not gateway.pool.any_healthy)
        refused = await client.post("/v1/completions", json=request)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "backend_unavailable"
        assert (await client.get("/health")).status_code == 503
        assert gateway.registry.loaded_on(gateway.registry.get("caps")) == []
        await wait_until(lambda: engine.starts == 2)
        gateway.vllm.down = False
        await wait_until(lambda: supervisor.restarts == 1)
        assert engine.stops == 2 and gateway.pool.any_healthy
        answer = await client.post("/v1/completions", json=request)
        watching.cancel()
    assert answer.status_code == 200, answer.text
    assert [body["lora_name"] for body in gateway.vllm.received(LOAD)] == [
        gateway.registry.get("caps").internal_name] * 2
    await gateway.pool.aclose()


async def test_eager_adapters_are_loaded_again_after_a_restart(tmp_path, llama_base, demo):
    gateway = await make_gateway(tmp_path, llama_base, demo, tmp_path / "store", eager=True)
    engine = FakeEngine(gateway.vllm)
    supervisor = EngineSupervisor(engine, gateway.pool, gateway.registry, eager=True,
                                  poll_interval_s=0.01)
    names = {entry.internal_name for entry in gateway.registry.entries()}
    async with gateway.app.router.lifespan_context(gateway.app):
        assert set(gateway.vllm.loaded) == names
        watching = asyncio.create_task(supervisor.run())
        engine.crash()
        gateway.vllm.down = False
        await wait_until(lambda: supervisor.restarts == 1)
        watching.cancel()
    assert set(gateway.vllm.loaded) == names
    assert len(gateway.vllm.received(LOAD)) == 2 * len(names)
    await gateway.pool.aclose()


def test_stop_kills_what_a_dead_server_left(tmp_path):
    """vLLM's engine core is a child of the server; killing the server alone leaves it."""
    server = EngineProcess(EngineSettings(model=tmp_path), log_path=tmp_path / "log")
    server.command = lambda: ["bash", "-c", "sleep 600 & exec sleep 600"]
    server.start()
    leader = psutil.Process(server.process.pid)
    deadline = time.monotonic() + 10
    while not leader.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    children = leader.children()
    assert len(children) == 1
    leader.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    assert server.exited()
    server.stop()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [] and server.process is None
