"""A gateway that started its own vLLM survives that vLLM being killed.

This one test pays for a second engine start (and a restart): the gateway must run its vLLM
itself to supervise it. The kill comes mid-stream, so the stream's error event, the 503s
while the engine is down, the restart and the reloading of adapters are all seen by a client.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import TEST_OUTPUT
from tests.gateway_process import GLOBEX_KEY, PROMPT, GatewayProcess, data_events, write_config

pytestmark = pytest.mark.vllm
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


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


def test_a_killed_vllm_is_restarted_and_serves_adapters_again(default_model, demo_adapters,
                                                               tmp_path):
    config = write_config(tmp_path / "gateway.toml", model=default_model,
                          adapters_dir=demo_adapters, roots=[], backends=[])
    gateway = GatewayProcess.start(config, TEST_OUTPUT / "gateway-restart.log")
    body = {"model": "pirate", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    try:
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
    finally:
        status = gateway.stop()
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "backend_error" and "during the stream" in error["message"]
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "backend_unavailable"
    assert health.status_code == 503
    assert restarted.pid != server.pid and leftovers == []
    assert after.status_code == 200, f"{after.text}\n{gateway.log_tail()}"
    assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
    assert status == 0 and not restarted.is_running()
