"""Idle HTTP connections, on both sides of the gateway, against real servers.

A request sent on a keep-alive connection at the moment the server closes it gets no answer.
So the gateway must stop reusing a connection to vLLM well before vLLM closes it (its
keep-alive is `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`, uvicorn's 5 s), and must itself keep an idle
client connection open longer than the proxies in front of it keep theirs. Which connection
a request used is told by its local port.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from vllm import envs as vllm_envs

from gateway.serve import KEEP_ALIVE_S
from gateway.upstream.pool import CLIENT_LIMITS, BackendPool
from gateway.upstream.vllm_api import HEALTH_PATH

pytestmark = pytest.mark.vllm
UVICORN_DEFAULT_KEEP_ALIVE_S = 5
# Idle times around vLLM's keep-alive at which the pool sends a request.
AROUND_VLLM_CLOSE_S = (-0.2, -0.05, 0.0, 0.05, 0.2)


def local_port(response: httpx.Response) -> int:
    """Read while the connection is open."""
    assert response.status_code == 200, response.text
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


@pytest.mark.anyio
async def test_the_pool_drops_an_idle_connection_well_before_vllm_closes_it(engine):
    """Idle for longer than the pool's expiry but well under vLLM's keep-alive, the
    connection vLLM still holds open is not used again (with httpx's default 5 s it was)."""
    idle_s = CLIENT_LIMITS.keepalive_expiry + 1.0
    assert idle_s < vllm_envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE - 1.0
    pool = BackendPool([engine.base_url])
    url = engine.base_url + HEALTH_PATH
    try:
        first = local_port(await pool.client.get(url))
        again = local_port(await pool.client.get(url))
        await asyncio.sleep(idle_s)
        after_idle = local_port(await pool.client.get(url))
    finally:
        await pool.aclose()
    assert again == first  # a fresh connection is reused
    assert after_idle != first


@pytest.mark.anyio
async def test_requests_spaced_around_vllms_idle_timeout_are_all_answered(engine):
    """The race itself is milliseconds wide, so this rarely catches it alone; it holds the
    pool to the outcome: every request answered, the replica never marked down."""
    pool = BackendPool([engine.base_url])
    [backend] = pool.backends
    body = {"model": engine.settings.served_model_name, "prompt": "Hi", "max_tokens": 1}
    statuses = []
    try:
        for offset in AROUND_VLLM_CLOSE_S:
            await pool.client.get(engine.base_url + HEALTH_PATH)
            await asyncio.sleep(vllm_envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE + offset)
            response = await pool.send(backend, "/v1/completions", body, stream=False)
            statuses.append(response.status_code)
    finally:
        await pool.aclose()
    assert statuses == [200] * len(AROUND_VLLM_CLOSE_S)
    assert backend.healthy


def test_the_gateway_keeps_an_idle_client_connection_open_past_uvicorns_default(
        real_gateway):
    assert KEEP_ALIVE_S > UVICORN_DEFAULT_KEEP_ALIVE_S
    limits = httpx.Limits(keepalive_expiry=KEEP_ALIVE_S)
    with httpx.Client(base_url=real_gateway.url, limits=limits, timeout=30) as client:
        first = local_port(client.get("/health"))
        time.sleep(UVICORN_DEFAULT_KEEP_ALIVE_S + 1.5)
        after_idle = local_port(client.get("/health"))
    assert after_idle == first
