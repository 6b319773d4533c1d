"""A gateway that started its own vLLM survives that vLLM being killed, and stops it when
it is stopped itself, after draining.

This module pays for a second engine start (and a restart): the gateway must run its vLLM
itself to supervise and stop it; its tests share that gateway, and the last one stops it.
The kill comes while vLLM generates a stream, so the stream's error event, the 503s while
the engine is down, the restart and the reloading of adapters are all seen by a client.
SIGTERM comes while two streams and a plain request run: the stream that ends within the
grace period ends normally; when it passes, the other is cut with a `shutting_down` error
event and the plain request answered 503 `shutting_down`; new requests meanwhile get 503
with `Retry-After`; then vLLM is stopped.
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

from gateway.config import DEFAULT_MAX_TOKENS
from tests.conftest import TEST_OUTPUT
from tests.gateway_process import (
    GLOBEX_KEY,
    PROMPT,
    GatewayProcess,
    data_events,
    poll_until,
    running_requests,
    write_config,
)

pytestmark = pytest.mark.vllm
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
GRACE_S = 20  # outlasts the short stream of the drain test on a loaded 2-core machine
SHORT = 32  # the tokens of that short stream
LONGEST = DEFAULT_MAX_TOKENS  # the longest stream a key may ask for: about a minute here


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


def engine_url(server: psutil.Process) -> str:
    command = server.cmdline()
    return f"http://127.0.0.1:{command[command.index('--port') + 1]}"


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
        long_body = {**body, "max_tokens": LONGEST, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=long_body) as stream:
            poll_until(lambda: running_requests(engine_url(server)) == 1,
                       "vLLM never ran the stream")
            server.kill()
            events = list(data_events(stream.iter_lines()))
        refused = client.post("/v1/completions", json=body)
        health = httpx.get(gateway.url + "/health", timeout=30)
        gateway.wait_healthy(timeout_s=600)
        restarted = vllm_server(gateway)
        after = client.post("/v1/completions", json=body)
    leftovers = list(process_group(server.pid))
    assert events[-1] == "[DONE]", events
    error = json.loads(events[-2]).get("error")
    assert error, f"no error event after {len(events)} events, ending {events[-3:]}"
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
            if stream.status_code != 200:
                into.append(f"refused: {stream.status_code} {stream.read().decode()}")
            for event in data_events(stream.iter_lines()):
                into.append(event)
                started.set()
    except httpx.HTTPError:
        into.append("cut")
    started.set()


def post_plain(gateway: GatewayProcess, into: list[httpx.Response | httpx.HTTPError]) -> None:
    """A long plain (not streamed) completion's answer, or its error, into `into`."""
    body = {"model": "caps", "prompt": PROMPT, "max_tokens": LONGEST, "ignore_eos": True}
    try:
        with gateway.client(GLOBEX_KEY) as client:
            into.append(client.post("/v1/completions", json=body))
    except httpx.HTTPError as error:
        into.append(error)


def test_sigterm_drains_refuses_new_requests_then_stops_vllm(own_gateway):
    """Runs last: it stops the module's gateway."""
    gateway = own_gateway
    server = vllm_server(gateway)
    short, long, plain = [], [], []
    readers = [threading.Thread(target=post_plain, args=(gateway, plain))]
    readers[0].start()
    poll_until(lambda: running_requests(engine_url(server)) == 1,
               "vLLM never ran the plain request")
    # The short stream starts last and SIGTERM comes on its first event: it has SHORT - 1
    # tokens left to run, a few seconds here, so it is in flight when the drain begins and ends
    # well within the grace period.
    for events, max_tokens in ((long, LONGEST), (short, SHORT)):
        started = threading.Event()
        reader = threading.Thread(target=read_stream, args=(gateway, max_tokens, events, started))
        reader.start()
        assert started.wait(300)
        readers.append(reader)
    assert long and '"choices"' in long[0], long  # generating: the drain must wait for it
    assert short and '"choices"' in short[0], short
    with gateway.client(GLOBEX_KEY) as client:  # made first: the drain's window is short
        gateway.process.send_signal(signal.SIGTERM)
        try:
            while (health := client.get("/health")).status_code == 200:  # until it drains
                time.sleep(0.05)
            refused = client.post("/v1/completions", json={"model": "base", "prompt": PROMPT})
        except httpx.ConnectError as error:
            raise AssertionError(f"stopped listening within the grace period: {long[-3:]}\n"
                                 f"{gateway.log_tail(60)}") from error
    for reader in readers:
        reader.join(timeout=GRACE_S + 120)
    status = gateway.process.wait(timeout=120)
    assert short[-1] == "[DONE]" and all('"choices"' in event for event in short[:-1]), short
    assert long[-1] == "[DONE]", long[-3:]
    assert json.loads(long[-2])["error"]["code"] == "shutting_down", long[-3:]
    assert len(long) < LONGEST and all('"choices"' in event for event in long[:-2])
    [cut] = plain
    assert isinstance(cut, httpx.Response) and cut.status_code == 503, cut
    assert cut.json()["error"]["code"] == "shutting_down" and cut.headers["retry-after"]
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503
    assert status == 0
    assert not server.is_running() and list(process_group(server.pid)) == []
    log = gateway.log_path.read_text(errors="replace")
    assert "draining: 3 request(s) in flight" in log and "grace period ended" in log
