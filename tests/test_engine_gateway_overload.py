"""Overload against a real gateway process in front of the session's vLLM: a burst of ten
times the tenants' concurrency limits gets only 200s and 429s (with `Retry-After`), in
bounded memory, and nothing hangs; a client that never reads its stream is cut off, its
generation aborted in vLLM, while another tenant is served meanwhile."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import TEST_OUTPUT
from tests.gateway_process import (
    ACME_KEY,
    GLOBEX_KEY,
    PROMPT,
    GatewayProcess,
    poll_until,
    running_requests,
    write_config,
)

pytestmark = pytest.mark.vllm
LIMITS = {ACME_KEY: 4, GLOBEX_KEY: 16}  # the tenants' max_concurrency in write_config
WRITE_TIMEOUT_S = 3
# How much the gateway's memory may grow over a burst of 200 requests.
BURST_RSS_GROWTH_BYTES = 64 << 20


@pytest.fixture(scope="module")
def gateway(engine, default_model, demo_adapters, tmp_path_factory) -> Iterator[GatewayProcess]:
    config = write_config(tmp_path_factory.mktemp("overload") / "gateway.toml",
                          model=default_model, adapters_dir=demo_adapters, roots=[],
                          backends=[engine.base_url],
                          server=f"stream_write_timeout_seconds = {WRITE_TIMEOUT_S}")
    gateway = GatewayProcess.start(config, TEST_OUTPUT / "gateway-overload.log")
    yield gateway
    gateway.stop()


def in_flight(gateway: GatewayProcess) -> float:
    """The gateway's own gauge, summed over tenants."""
    metrics = httpx.get(gateway.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("dora_gateway_requests_in_flight{"))


async def burst(gateway: GatewayProcess) -> list[httpx.Response]:
    """Ten times each tenant's limit at once, every other request streamed, each on its own
    connection."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=300, limits=limits) as client:
        async def one(key: str, stream: bool) -> httpx.Response:
            body = {"model": "base", "prompt": PROMPT, "max_tokens": 8, "stream": stream}
            headers = {"Authorization": f"Bearer {key}"}
            async with client.stream("POST", "/v1/completions", json=body,
                                     headers=headers) as response:
                await response.aread()
            return response

        return await asyncio.wait_for(asyncio.gather(*(
            one(key, stream=index % 2 == 1) for key, limit in LIMITS.items()
            for index in range(10 * limit))), timeout=600)


def test_a_burst_of_ten_times_the_limits_gets_200s_and_429s(gateway):
    process = psutil.Process(gateway.process.pid)
    rss_before = process.memory_info().rss
    responses = asyncio.run(burst(gateway))
    rss_after = process.memory_info().rss
    statuses = Counter(response.status_code for response in responses)
    TEST_OUTPUT.mkdir(exist_ok=True)
    (TEST_OUTPUT / "overload.json").write_text(json.dumps({
        "requests": len(responses), "statuses": statuses,
        "rss_mib": {"before": rss_before / 2**20, "after": rss_after / 2**20}}, indent=2))
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= sum(LIMITS.values()) and statuses[429] > 0, statuses
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"]
            assert response.json()["error"]["type"] == "rate_limit_error"
        elif response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]")
    assert rss_after - rss_before < BURST_RSS_GROWTH_BYTES
    poll_until(lambda: in_flight(gateway) == 0, "the gateway still counts requests in flight",
               300)


def never_reading_stream(gateway: GatewayProcess) -> socket.socket:
    """A stream request on a socket with a tiny receive buffer that is then never read: the
    answer (8 choices with 20 log-probabilities per token) soon fills every buffer."""
    body = json.dumps({"model": "base", "messages": [{"role": "user", "content": PROMPT}],
                       "max_tokens": 1000, "ignore_eos": True, "n": 8, "logprobs": True,
                       "top_logprobs": 20, "stream": True}).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])))
    client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                   b"Authorization: Bearer " + GLOBEX_KEY.encode() + b"\r\n"
                   b"Content-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return client


def test_a_client_that_never_reads_is_cut_off_and_its_generation_aborted(gateway, engine):
    client = never_reading_stream(gateway)
    try:
        poll_until(lambda: running_requests(engine.base_url) == 8, "vLLM never ran 8 requests", 300)
        with gateway.client(ACME_KEY) as other:  # another tenant meanwhile
            served = other.post("/v1/completions", json={"model": "base", "prompt": PROMPT,
                                                         "max_tokens": 4})
        poll_until(lambda: running_requests(engine.base_url) == 0, "vLLM still runs requests", 300)
        poll_until(lambda: in_flight(gateway) == 0, "the gateway still counts requests in flight",
               300)
        client.settimeout(60)
        while client.recv(1 << 20):  # what the buffers held, then the gateway's close
            pass
    finally:
        client.close()
    assert served.status_code == 200, served.text
    assert "abandoned" in gateway.log_tail(200)
