"""A gateway that started its own vLLM survives that vLLM being killed, and stops it when
it is stopped itself, after draining.

This module pays for a second engine start (and a restart): the gateway must run its vLLM
itself to supervise and stop it; its tests share that gateway, and the last one stops it.
The kill comes mid-stream, so the stream's error event, the 503s while the engine is down,
the restart and the reloading of adapters are all seen by a client. SIGTERM comes while two
streams run: the one that ends within the grace period ends normally, the other is cut when
it passes; new requests meanwhile get 503 with `Retry-After`; then vLLM is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import TEST_OUTPUT
from tests.gateway_process import GLOBEX_KEY, PROMPT, GatewayProcess, data_events, write_config

pytestmark = pytest.mark.vllm
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
GRACE_S = 5


@pytest.fixture(scope="module")
def own_gateway(default_model, demo_adapters, tmp_path_factory) -> Iterator[GatewayProcess]:
    """A gateway with its own supervised vLLM (no `backends`)."""
    config = write_config(tmp_path_factory.mktemp("own-engine") / "gateway.toml",
                          model=default_model, adapters_dir=demo_adapters, roots=[],
                          backends=[], server=f"shutdown_grace_seconds = {GRACE_S}")
    gateway = GatewayProcess.start(config, TEST_OUTPUT / "gateway-restart.log")
    yield gateway
    gateway.stop()


def vllm_server(gateway: GatewayProcess) -> psutil.Process:
    [server] = [child for child in psutil.Process(gateway.process.pid).children()
                if SERVER_MODULE in child.cmdline()]
    return server


def process_group(pgid: int) -> Iterator[psutil.Process]:
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                yield process
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass


def test_a_killed_vllm_is_restarted_and_serves_adapters_again(own_gateway):
    gateway = own_gateway
    body = {"model": "pirate", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    server = vllm_server(gateway)
    with gateway.client(GLOBEX_KEY) as client:
        before = client.post("/v1/completions", json=body)
        assert before.status_code == 200, before.text
        long_body = {**body, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=long_body) as stream:
            events = data_events(stream.iter_lines())
            next(events)
            server.kill()
            rest = list(events)
        refused = client.post("/v1/completions", json=body)
        health = httpx.get(gateway.url + "/health", timeout=30)
        gateway.wait_healthy(timeout_s=600)
        restarted = vllm_server(gateway)
        after = client.post("/v1/completions", json=body)
    leftovers = list(process_group(server.pid))
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "backend_error" and "during the stream" in error["message"]
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "backend_unavailable"
    assert health.status_code == 503
    assert restarted.pid != server.pid and leftovers == []
    assert after.status_code == 200, f"{after.text}\n{gateway.log_tail()}"
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]


def read_stream(gateway: GatewayProcess, max_tokens: int, into: list[str], started: threading.Event,
                ) -> None:
    """A completion stream's events into `into` (then "cut" if the connection broke)."""
    body = {"model": "caps", "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    try:
        with gateway.client(GLOBEX_KEY) as client, client.stream(
                "POST", "/v1/completions", json=body) as stream:
            for event in data_events(stream.iter_lines()):
                into.append(event)
                started.set()
    except httpx.HTTPError:
        into.append("cut")
    started.set()


def test_sigterm_drains_refuses_new_requests_then_stops_vllm(own_gateway):
    """Runs last: it stops the module's gateway."""
    gateway = own_gateway
    server = vllm_server(gateway)
    short, long = [], []
    readers = []
    for events, max_tokens in ((short, 16), (long, 1000)):
        started = threading.Event()
        reader = threading.Thread(target=read_stream, args=(gateway, max_tokens, events, started))
        reader.start()
        assert started.wait(300)
        readers.append(reader)
    gateway.process.send_signal(signal.SIGTERM)
    with gateway.client(GLOBEX_KEY) as client:
        while (health := client.get("/health")).status_code == 200:  # until it drains
            time.sleep(0.05)
        refused = client.post("/v1/completions", json={"model": "base", "prompt": PROMPT})
    for reader in readers:
        reader.join(timeout=GRACE_S + 120)
    status = gateway.process.wait(timeout=120)
    assert short[-1] == "[DONE]" and len(short) > 2
    assert long[-1] == "cut", long[-3:]
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503
    assert status == 0
    assert not server.is_running() and list(process_group(server.pid)) == []
    log = gateway.log_tail(100)
    assert "draining: 2 request(s) in flight" in log and "grace period ended" in log
