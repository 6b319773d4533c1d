"""Two real gateway processes over one real PostgreSQL and one shared store, in front of the
session's real vLLM: they serve the same adapters, converge after every admin change, give one
201 and one 409 to concurrent adds of one name, survive the faults of a shared database, and
hold a tenant to one limit (counters in one real Redis) with one account of its usage.

Replica `a` reaches PostgreSQL through a TCP relay the tests cut, so `a` loses the database
while `b` keeps it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from gateway.engine.process import free_port
from gateway.registry.schema import SCHEMA_VERSION
from tests.conftest import TEST_OUTPUT
from tests.gateway_process import (
    ACME_KEY,
    ADMIN_KEY,
    GATEWAY_CLI,
    GLOBEX_KEY,
    PROMPT,
    GatewayProcess,
    gateway_home,
    write_config,
)
from tests.postgres_server import PostgresServer, TcpRelay

pytestmark = pytest.mark.vllm
ADAPTERS = "/admin/adapters"
DEMO = {"caps", "pirate", "brief", "caps-lora"}
FILES = ("adapter_config.json", "adapter_model.safetensors")
# Replicas poll every second; this is only how long a test waits before it gives up.
CONVERGE_S = 30
LIMITED_TPM = 120
LOAD_CLIENTS = 4
LOAD_S = 12
LOAD_MODELS = ("base", "caps")
USAGE_FIELDS = ("requests", "errors", "prompt_tokens", "completion_tokens")
# The most a load request is charged on entry: "The ocean is" guessed at 4 tokens, 4 out.
MAX_CHARGE = 8


@dataclass
class Replicas:
    a: GatewayProcess
    b: GatewayProcess
    configs: dict[str, Path]
    env: dict[str, str]
    relay: TcpRelay
    url: str
    home: Path

    def restart_a(self) -> None:
        self.a.stop()
        self.a = start(self.configs["a"], "a", self.env)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def replicas(engine, default_model, demo_adapters, postgres, redis_server, tmp_path_factory
             ) -> Iterator[Replicas]:
    """`a` and `b`, started together on an empty database, over one shared home (the
    compiled store and the uploads: the shared volume), their limit counters in one Redis."""
    redis_server.flush()
    url = postgres.create_database("replicas")
    relay = TcpRelay(postgres.port)
    relay.restore()
    directory = tmp_path_factory.mktemp("replicas")
    home = gateway_home(directory / "shared")
    env = {**os.environ, "DORA_GATEWAY_HOME": str(home)}
    configs = {name: write_config(directory / f"{name}.toml", model=default_model,
                                  adapters_dir=demo_adapters, roots=[],
                                  backends=[engine.base_url], registry_url=registry_url,
                                  limits_store=redis_server.url)
               for name, registry_url in (("a", url.replace(str(postgres.port),
                                                            str(relay.port))), ("b", url))}
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda name: start(configs[name], name, env), ("a", "b"))
    group = Replicas(a, b, configs, env, relay, url, home)
    try:
        yield group
    finally:
        group.a.stop()
        group.b.stop()
        relay.cut()


def start(config: Path, name: str, env: dict[str, str]) -> GatewayProcess:
    return GatewayProcess.start(config, TEST_OUTPUT / f"gateway-replica-{name}.log", env=env)


def complete(gateway: GatewayProcess, model: str) -> httpx.Response:
    with gateway.client(GLOBEX_KEY) as client:
        return client.post("/v1/completions", json={"model": model, "prompt": PROMPT,
                                                     "max_tokens": 6, "temperature": 0})


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def admin(gateway: GatewayProcess) -> httpx.Client:
    return gateway.client(ADMIN_KEY)


def listed(gateway: GatewayProcess) -> dict[str, str]:
    """Adapter name -> content hash, as the admin API lists them."""
    with admin(gateway) as client:
        return {item["name"]: item["hash"] for item in client.get(ADAPTERS).json()["data"]}


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CONVERGE_S
    while not check():
        assert time.monotonic() < deadline, f"not within {CONVERGE_S}s: {what}"
        time.sleep(0.2)


def upload_body(directory: Path) -> tuple[bytes, str]:
    """A multipart body with the adapter's two files, and its content type."""
    request = httpx.Request("POST", "http://x", files=[
        (file, (file, (directory / file).read_bytes())) for file in FILES])
    return request.read(), request.headers["content-type"]


def test_both_replicas_serve_the_directory_adapters_registered_once(replicas):
    a, b = listed(replicas.a), listed(replicas.b)
    assert set(a) == DEMO and a == b
    with psycopg.connect(replicas.url) as connection:
        rows = connection.execute("SELECT name, added_by FROM adapters").fetchall()
        versions = connection.execute("SELECT version FROM schema_version").fetchall()
    assert sorted(rows) == sorted((name, "adapters-dir") for name in DEMO)
    assert versions == [(version,) for version in range(1, SCHEMA_VERSION + 1)]
    assert text(complete(replicas.a, "pirate")) == text(complete(replicas.b, "pirate"))


def test_a_tenant_has_one_limit_across_replicas_and_one_account_of_its_usage(replicas):
    """A tokens-per-minute limit set through `a` holds on `b` too. Four clients then spread a
    mixed load (base and `caps`, plain and streamed) over both replicas, waiting as each 429's
    `retry-after-ms` says: both replicas refuse, and the tokens served stay within one
    limit: at least the bucket's capacity less one request, at most the capacity plus the
    refill over the load plus one request per client (charged on entry, settled after).
    Two separate limits would serve up to twice the capacity. The usage both report equals
    the sum of vLLM's usage fields in the answers, refusals counted as errors."""
    a, b = replicas.a, replicas.b
    with admin(a) as client:
        assert client.put("/admin/tenants/acme/limits",
                          json={"tokens_per_minute": LIMITED_TPM}).status_code == 200
    try:
        eventually(lambda: tenant_limits(b, "acme")["tokens_per_minute"] == LIMITED_TPM,
                   "b enforces the limit set through a")
        before = usage(b, "acme")
        started = time.monotonic()
        with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
            answers = [answer for answers in pool.map(load_client, range(LOAD_CLIENTS),
                                                      [replicas] * LOAD_CLIENTS)
                       for answer in answers]
        elapsed = time.monotonic() - started
        served = [answer for answer in answers if answer.status == 200]
        refused = [answer for answer in answers if answer.status == 429]
        assert len(served) + len(refused) == len(answers)
        assert {answer.replica for answer in served} == {answer.replica for answer in refused} \
            == {"a", "b"}
        tokens = sum(answer.usage["total_tokens"] for answer in served)
        refill = LIMITED_TPM / 60 * elapsed
        assert LIMITED_TPM - MAX_CHARGE <= tokens <= LIMITED_TPM + refill + \
            LOAD_CLIENTS * MAX_CHARGE, (tokens, elapsed)

        expected = {model: expected_usage([answer for answer in answers if answer.model == model])
                    for model in LOAD_MODELS}
        eventually(lambda: usage_since(before, usage(b, "acme")) == expected,
                   "both replicas' usage written")
        assert usage_since(before, usage(a, "acme")) == expected
    finally:
        with admin(b) as client:
            client.delete("/admin/tenants/acme/limits")


@dataclass(frozen=True)
class Answer:
    replica: str
    model: str
    status: int
    usage: dict | None


def load_client(index: int, replicas: Replicas) -> list[Answer]:
    """Requests for LOAD_S seconds, alternating replicas, models and streaming; after a 429,
    the wait it asks for."""
    answers = []
    deadline = time.monotonic() + LOAD_S
    while time.monotonic() < deadline:
        turn = index + len(answers)
        replica = ("a", "b")[turn % 2]
        model = LOAD_MODELS[turn // 2 % 2]
        answer = acme_completion(getattr(replicas, replica), replica, model,
                                 stream=turn % 3 == 0)
        answers.append(answer.result)
        if answer.result.status == 429:
            wait_s = int(answer.headers["retry-after-ms"]) / 1000
            time.sleep(max(0.0, min(wait_s, deadline - time.monotonic())))
    return answers


@dataclass(frozen=True)
class Sent:
    result: Answer
    headers: httpx.Headers


def acme_completion(gateway: GatewayProcess, replica: str, model: str, *,
                    stream: bool) -> Sent:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    with gateway.client(ACME_KEY) as client:
        response = client.post("/v1/completions", json=body)
    found = None
    if response.status_code == 200:
        found = streamed_usage(response.text) if stream else response.json()["usage"]
    return Sent(Answer(replica, model, response.status_code, found), response.headers)


def streamed_usage(text: str) -> dict:
    events = [json.loads(line[len("data: "):]) for line in text.splitlines()
              if line.startswith("data: {")]
    usages = [event["usage"] for event in events if event.get("usage")]
    assert len(usages) == 1, text
    return usages[0]


def expected_usage(answers: list[Answer]) -> dict[str, int]:
    served = [answer.usage for answer in answers if answer.usage is not None]
    return {"requests": len(answers),
            "errors": sum(answer.status != 200 for answer in answers),
            "prompt_tokens": sum(usage["prompt_tokens"] for usage in served),
            "completion_tokens": sum(usage["completion_tokens"] for usage in served)}


def usage(gateway: GatewayProcess, tenant: str) -> dict[str, dict[str, int]]:
    """The tenant's usage per adapter, as the admin API reports it."""
    with admin(gateway) as client:
        rows = client.get("/admin/usage", params={"tenant": tenant,
                                                  "group_by": "adapter"}).json()["data"]
    return {row["adapter"]: {key: row[key] for key in USAGE_FIELDS} for row in rows}


def usage_since(before: dict, after: dict) -> dict[str, dict[str, int]]:
    return {adapter: {key: counts[key] - before.get(adapter, {}).get(key, 0)
                      for key in USAGE_FIELDS}
            for adapter, counts in after.items()
            if counts != before.get(adapter)}


def tenant_limits(gateway: GatewayProcess, tenant: str) -> dict:
    with admin(gateway) as client:
        tenants = client.get("/admin/tenants").json()["data"]
    return next(item for item in tenants if item["name"] == tenant)["limits"]


def test_an_add_through_one_replica_is_served_by_the_other_and_a_removal_is_404_everywhere(
        replicas, demo_adapters):
    a, b = replicas.a, replicas.b
    with admin(a) as client:
        added = client.post(ADAPTERS, json={"name": "caps2", "path": "caps"})
    assert added.status_code == 201, added.text
    eventually(lambda: complete(b, "caps2").status_code == 200, "b serves caps2")
    assert text(complete(b, "caps2")) == text(complete(a, "caps2")) == text(complete(a, "caps"))

    body, content_type = upload_body(demo_adapters / "pirate")
    with admin(b) as client:
        uploaded = client.post(f"{ADAPTERS}/uploaded/upload", content=body,
                               headers={"Content-Type": content_type})
    assert uploaded.status_code == 201, uploaded.text
    assert Path(uploaded.json()["source"]).parent == replicas.home / "uploads"
    eventually(lambda: complete(a, "uploaded").status_code == 200, "a serves the upload")
    assert text(complete(a, "uploaded")) == text(complete(a, "pirate"))

    with admin(b) as client:
        assert client.delete(f"{ADAPTERS}/caps2").status_code == 204
    eventually(lambda: complete(a, "caps2").status_code == 404, "caps2 is gone from a")
    with admin(a) as client:
        again = client.delete(f"{ADAPTERS}/caps2")
    assert again.status_code == 404 and again.json()["error"]["code"] == "adapter_not_found"
    eventually(lambda: listed(a) == listed(b), "both list the same adapters")


def test_concurrent_adds_of_one_name_give_one_201_and_one_409(replicas):
    for round_ in range(3):
        name = f"race{round_}"
        barrier = threading.Barrier(2)

        def add(gateway: GatewayProcess, name: str = name,
                barrier: threading.Barrier = barrier) -> httpx.Response:
            with admin(gateway) as client:
                barrier.wait()
                return client.post(ADAPTERS, json={"name": name, "path": "pirate"})

        with ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(add, (replicas.a, replicas.b)))
        assert sorted(response.status_code for response in responses) == [201, 409], [
            response.text for response in responses]
        conflict = next(response for response in responses if response.status_code == 409)
        assert conflict.json()["error"]["code"] == "adapter_exists"
    eventually(lambda: listed(replicas.a) == listed(replicas.b), "both list the races")


def test_the_database_down_at_start_is_a_clear_error(replicas):
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/replicas"
    config = replicas.configs["b"].read_text().replace(replicas.url, nowhere)
    path = replicas.configs["b"].with_name("unreachable.toml")
    path.write_text(config)
    result = subprocess.run([GATEWAY_CLI, "serve", "--config", str(path)], env=replicas.env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith(f"dora-gateway serve: cannot open the registry {nowhere}:")
    assert "Connection refused" in result.stderr and "[registry] url" in result.stderr


def test_a_replica_cut_off_from_the_database_keeps_serving_and_catches_up(replicas):
    a, b = replicas.a, replicas.b
    replicas.relay.cut()
    try:
        assert complete(a, "brief").status_code == 200
        with admin(a) as client:
            refused = [client.post(ADAPTERS, json={"name": "late", "path": "pirate"}),
                       client.delete(f"{ADAPTERS}/pirate")]
            assert client.get(ADAPTERS).status_code == 200
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "registry_unavailable"
        with admin(b) as client:
            assert client.post(ADAPTERS, json={"name": "late", "path": "pirate"}
                               ).status_code == 201
            assert client.delete(f"{ADAPTERS}/brief").status_code == 204
        assert complete(a, "brief").status_code == 200
        assert complete(a, "late").status_code == 404
    finally:
        replicas.relay.restore()
    eventually(lambda: complete(a, "late").status_code == 200, "a serves late")
    assert complete(a, "brief").status_code == 404
    assert listed(a) == listed(b)


def test_a_replica_killed_mid_upload_or_mid_add_leaves_nothing_registered(replicas,
                                                                          demo_adapters):
    body, content_type = upload_body(demo_adapters / "caps")
    half_sent = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        half_sent.set()
        time.sleep(60)
        yield body[len(body) // 2:]

    def upload() -> None:
        with admin(replicas.a) as client, contextlib.suppress(httpx.HTTPError):  # killed
            client.post(f"{ADAPTERS}/halfway/upload", content=slow_body(),
                        headers={"Content-Type": content_type})

    uploading = threading.Thread(target=upload, daemon=True)
    uploading.start()
    assert half_sent.wait(60)
    replicas.a.process.kill()
    replicas.a.process.wait()
    replicas.restart_a()
    assert complete(replicas.a, "halfway").status_code == 404
    assert "halfway" not in listed(replicas.b)
    assert not [path for path in (replicas.home / "uploads").iterdir()
                if path.name.startswith(".")]

    with psycopg.connect(replicas.url, autocommit=False) as blocker:
        # Holding the generation row: an add compiles, then waits to write its row.
        blocker.execute("SELECT generation FROM registry_generation FOR UPDATE")
        adding = threading.Thread(target=lambda: add_quietly(replicas.a, "halfway"),
                                  daemon=True)
        adding.start()
        eventually(lambda: add_is_waiting(replicas.url), "the add waits for its row")
        replicas.a.process.kill()
        replicas.a.process.wait()
        blocker.rollback()
    replicas.restart_a()
    assert "halfway" not in listed(replicas.a) and "halfway" not in listed(replicas.b)
    assert complete(replicas.a, "halfway").status_code == 404
    with admin(replicas.b) as client:
        assert client.post(ADAPTERS, json={"name": "halfway", "path": "caps"}).status_code == 201
    eventually(lambda: complete(replicas.a, "halfway").status_code == 200, "a serves it now")


def add_quietly(gateway: GatewayProcess, name: str) -> None:
    with admin(gateway) as client, contextlib.suppress(httpx.HTTPError):  # killed under it
        client.post(ADAPTERS, json={"name": name, "path": "caps"})


def add_is_waiting(url: str) -> bool:
    with psycopg.connect(url) as connection:
        waiting = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE 'UPDATE registry_generation%'").fetchone()[0]
    return waiting > 0
