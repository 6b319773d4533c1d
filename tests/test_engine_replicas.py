"""Two real vLLM replicas behind one gateway: adapter affinity, spill-over, discovery, failover.

The replicas (the default model, eager, one LoRA slot each, each pinned to its own core) run
for this module only, on 127.0.0.1 and 127.0.0.2 with the same port (`tests/replicas.py`), so
one DNS name that resolves to both addresses stands for both. A real gateway process routes
over their URLs; the discovery test runs the gateway app in-process with a resolver that
answers that name. The failover test kills a replica, so it runs last.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.engine.process import EngineProcess, EngineSettings
from gateway.upstream.health_checks import refresh
from gateway.upstream.vllm_api import METRICS_PATH, requests_held
from tests.conftest import TEST_OUTPUT
from tests.gateway_fakes import make_gateway
from tests.gateway_process import (
    ADMIN_KEY,
    GLOBEX_KEY,
    PROMPT,
    GatewayProcess,
    data_events,
    poll_until,
    write_config,
)
from tests.replicas import HOSTS, PinnedEngine, running_replicas

pytestmark = pytest.mark.vllm
REPLICAS_NAME = "vllm-replicas.test"
SKEWED = ["caps"] * 6 + ["pirate"] * 3 + ["brief"] * 2 + ["caps-lora"]


@pytest.fixture(scope="module")
def replicas(default_model: Path) -> Iterator[list[PinnedEngine]]:
    settings = EngineSettings(model=default_model, max_loras=1, max_cpu_loras=4,
                              max_lora_rank=16)
    with running_replicas(settings, TEST_OUTPUT, "vllm-replica") as engines:
        yield engines


@pytest.fixture(scope="module")
def gateway(replicas, default_model, demo_adapters, tmp_path_factory) -> Iterator[GatewayProcess]:
    config = write_config(tmp_path_factory.mktemp("replicas") / "gateway.toml",
                          model=default_model, adapters_dir=demo_adapters, roots=[],
                          backends=[engine.base_url for engine in replicas], max_loras=1)
    gateway = GatewayProcess.start(config, TEST_OUTPUT / "gateway-replicas.log")
    yield gateway
    gateway.stop()


def complete(gateway: GatewayProcess, model: str) -> httpx.Response:
    with gateway.client(GLOBEX_KEY) as client:
        return client.post("/v1/completions", json={"model": model, "prompt": PROMPT,
                                                    "max_tokens": 4, "temperature": 0})


def placements(gateway: GatewayProcess) -> dict[str, list[str]]:
    with gateway.client(ADMIN_KEY) as client:
        listed = client.get("/admin/adapters").json()["data"]
    return {adapter["name"]: adapter["loaded_backends"] for adapter in listed}


def served_by(engine: EngineProcess) -> set[str]:
    """The adapters vLLM itself lists, by their gateway names."""
    models = httpx.get(engine.base_url + "/v1/models", timeout=30).json()["data"]
    return {model["id"].split("--")[0] for model in models if "--" in model["id"]}


def held(engine: EngineProcess) -> int:
    return requests_held(httpx.get(engine.base_url + METRICS_PATH, timeout=30).text)


def test_skewed_traffic_loads_each_adapter_on_one_replica(gateway, replicas):
    traffic = random.Random(7).sample(SKEWED, len(SKEWED))
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda model: complete(gateway, model), traffic))
    assert [answer.status_code for answer in answers] == [200] * len(traffic)
    placed = placements(gateway)
    assert all(len(placed[name]) == 1 for name in set(SKEWED)), placed
    assert {url for urls in placed.values() for url in urls} == {e.base_url for e in replicas}
    on_replicas = [served_by(engine) for engine in replicas]
    assert on_replicas[0].isdisjoint(on_replicas[1])
    assert on_replicas[0] | on_replicas[1] == set(SKEWED)
    # what the gateway reads as vLLM's load: nothing held once every answer is in
    assert [held(engine) for engine in replicas] == [0, 0]


def test_a_saturated_replica_spills_its_hot_adapter_to_the_other(gateway, replicas):
    [home] = placements(gateway)["pirate"]
    # long enough to be running still when the last one starts
    body = {"model": "pirate", "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with gateway.client(GLOBEX_KEY) as client, contextlib.ExitStack() as streams:
        reading = []  # kept: a dropped line iterator closes its stream
        for _ in range(6):  # each one running before the next is sent
            stream = streams.enter_context(client.stream("POST", "/v1/completions", json=body))
            assert stream.status_code == 200
            reading.append(data_events(stream.iter_lines()))
            next(reading[-1])
        running = [held(engine) for engine in replicas]
    assert sum(running) == 6 and min(running) >= 1, running
    assert sorted(placements(gateway)["pirate"]) == sorted(e.base_url for e in replicas)
    assert all("pirate" in served_by(engine) for engine in replicas)
    assert home in placements(gateway)["pirate"]
    wait_idle(replicas)


def wait_idle(replicas: list[PinnedEngine], timeout_s: float = 60) -> None:
    """Until vLLM holds no request (closed streams are aborted a moment later)."""
    poll_until(lambda: not any(held(engine) for engine in replicas),
               "the replicas still hold aborted requests", timeout_s)


@pytest.mark.anyio
async def test_discovery_finds_both_replicas_behind_one_name(replicas, default_model,
                                                             demo_adapters, tmp_path):
    answer = list(HOSTS)

    async def resolve(host: str, port: int) -> list[str]:
        if host != REPLICAS_NAME:
            raise OSError(f"unknown name {host}")
        return list(answer)

    name = f"dns+http://{REPLICAS_NAME}:{replicas[0].port}"
    app = await make_gateway(tmp_path, default_model, demo_adapters, tmp_path / "store",
                             backends=[name], resolver=resolve, client=httpx.AsyncClient(
                                 timeout=httpx.Timeout(300, connect=5)))
    async with app.app.router.lifespan_context(app.app), app.client(GLOBEX_KEY) as client:
        assert app.pool.health() == {engine.base_url: True for engine in replicas}

        async def complete_each(models: list[str]) -> None:
            for model in models:
                response = await client.post("/v1/completions", json={
                    "model": model, "prompt": PROMPT, "max_tokens": 2}, timeout=300)
                assert response.status_code == 200, response.text

        await complete_each(["caps", "pirate", "brief", "caps-lora"])
        used = {url for entry in app.registry.entries() for url in app.registry.loaded_on(entry)}
        assert used == {engine.base_url for engine in replicas}
        answer.remove(HOSTS[1])  # the second replica leaves the name
        await refresh(app.pool, app.registry, eager=False)
        assert app.pool.health() == {replicas[0].base_url: True}
        await complete_each(["brief", "caps-lora"])
        assert all(app.registry.loaded_on(entry) == [replicas[0].base_url]
                   for entry in app.registry.entries() if entry.name in ("brief", "caps-lora"))
        answer.append(HOSTS[1])  # and comes back: checked, then routed to again
        await refresh(app.pool, app.registry, eager=False)
        assert app.pool.health() == {engine.base_url: True for engine in replicas}
    await app.pool.aclose()


def test_a_killed_replica_leaves_at_once_and_its_adapters_load_on_the_other(gateway, replicas):
    """The kill comes while the replica generates a plain (non-streamed) answer: that request
    is answered by the other replica."""
    before = placements(gateway)
    victim = next(engine for engine in replicas
                  if any(urls == [engine.base_url] for urls in before.values()))
    [survivor] = [engine for engine in replicas if engine is not victim]
    lost = sorted(name for name, urls in before.items() if urls == [victim.base_url])
    body = {"model": lost[0], "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True,
            "temperature": 0}
    with ThreadPoolExecutor(1) as pool, gateway.client(GLOBEX_KEY) as client:
        in_flight = pool.submit(client.post, "/v1/completions", json=body)
        poll_until(lambda: held(victim) == 1, "vLLM does not hold the request")
        victim.kill()
        dropped = in_flight.result()
    assert dropped.status_code == 200, dropped.text
    assert dropped.json()["usage"]["completion_tokens"] == 64
    for model in [*lost, "base", *lost]:
        answer = complete(gateway, model)
        assert answer.status_code == 200, answer.text
    after = placements(gateway)
    assert all(after[name] == [survivor.base_url] for name in lost), after
    with gateway.client(ADMIN_KEY) as client:
        metrics = client.get("/metrics").text
    up = {sample.labels["backend"]: sample.value
          for family in text_string_to_metric_families(metrics)
          for sample in family.samples if sample.name == "dora_gateway_backend_up"}
    assert up == {victim.base_url: 0, survivor.base_url: 1}
    assert set(lost) <= served_by(survivor)
