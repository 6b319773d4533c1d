"""Routing over several replicas, discovery and failover, against fake vLLMs.

The policy itself is checked on plain `Backend` records; the rest goes through the gateway app
with `httpx.MockTransport` fakes: where adapters get loaded, a hot adapter spilling over, a
replica failing, and a DNS name whose answer changes. tests/test_engine_replicas.py checks
the same against two real vLLM replicas.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from gateway.upstream.discovery import DnsName, system_resolver
from gateway.upstream.health_checks import refresh
from gateway.upstream.pool import Backend, BackendPool, Visit
from gateway.upstream.routing import ROUND_ROBIN, RoutingPolicy
from gateway.upstream.vllm_api import requests_held
from tests.gateway_fakes import GLOBEX_KEY, FakeVllm, make_gateway, wait_until
from tests.test_gateway_openai import call_asgi

CHAT = "/v1/chat/completions"
LOAD = "/v1/load_lora_adapter"
MESSAGES = [{"role": "user", "content": "Hi"}]


def backend(url: str, *, load: int = 0, adapters: set[str] = frozenset(),
            active: dict[str, int] | None = None) -> Backend:
    return Backend(url, in_flight=load, adapters=set(adapters), active=Counter(active or {}))


def first_choice(backends: list[Backend], adapter: str | None, **policy) -> str:
    return RoutingPolicy(**policy).order(backends, adapter, turn=0)[0].url


def test_an_adapter_goes_where_it_is_loaded_while_that_replica_is_within_the_bound():
    a, b = backend("a", load=2, adapters={"x"}), backend("b", load=1)
    assert first_choice([a, b], "x") == "a"
    assert first_choice([b, a], "x") == "a"


def test_an_adapter_being_loaded_counts_as_placed():
    """The second of two first requests for `x` follows the first, which is loading it."""
    loading, idle = backend("loading", load=1, active={"x": 1}), backend("idle")
    assert first_choice([idle, loading], "x", max_loras=1) == "loading"


def test_a_saturated_replica_spills_its_adapter_to_another():
    # bound = ceil(1.25 * (4 + 1) / 2) = 4: `a` is at it, so `x` goes to `b`
    a, b = backend("a", load=4, adapters={"x"}), backend("b", load=0)
    assert RoutingPolicy().load_bound([a, b]) == 4
    assert first_choice([a, b], "x") == "b"
    # a load factor of 2 lets `a` carry more than its share before spilling
    assert first_choice([a, b], "x", load_factor=2.0) == "a"


def test_a_new_adapter_prefers_a_free_slot_then_the_least_loaded():
    busy = backend("busy", load=1, active={"y": 1})
    free = backend("free", load=2, active={"z": 2})
    policy = {"max_loras": 1}
    assert first_choice([busy, free], "x", **policy) == "busy"  # no slot free on either
    free.active = Counter()
    assert first_choice([busy, free], "x", **policy) == "free"


def test_ties_go_to_the_replica_with_fewer_adapters_loaded():
    a, b = backend("a", adapters={"y", "z"}), backend("b", adapters={"w"})
    assert first_choice([a, b], "x") == "b"


def test_base_model_requests_go_to_the_least_loaded_replica():
    a, b = backend("a", load=3, adapters={"x"}), backend("b", load=1)
    assert first_choice([a, b], None) == "b"


def test_round_robin_ignores_load_and_adapters():
    a, b = backend("a", load=9), backend("b", adapters={"x"})
    policy = RoutingPolicy(kind=ROUND_ROBIN)
    assert [policy.order([a, b], "x", turn)[0].url for turn in range(4)] == ["a", "b"] * 2


def test_a_visit_counts_in_the_load_until_it_ends():
    b = backend("b")
    visit = Visit(b, "x")
    assert (b.load, dict(b.active)) == (1, {"x": 1})
    visit.end()
    visit.end()
    assert (b.load, dict(b.active)) == (0, {})


def test_requests_held_sums_vllms_running_and_waiting_gauges():
    text = ('# HELP vllm:num_requests_running Number of requests in model execution batches.\n'
            'vllm:num_requests_running{engine="0",model_name="base"} 3.0\n'
            'vllm:num_requests_waiting{engine="0",model_name="base"} 2.0\n'
            'vllm:num_requests_waiting_by_reason{reason="capacity"} 7.0\n')
    assert requests_held(text) == 5


def test_dns_names_parse_and_map_addresses_to_urls():
    name = DnsName.parse("dns+http://vllm-headless.ns.svc:8000")
    assert name == DnsName("http", "vllm-headless.ns.svc", 8000)
    assert name.url("10.0.0.7") == "http://10.0.0.7:8000"
    assert name.url("fd00::7") == "http://[fd00::7]:8000"
    assert DnsName.parse("dns+https://vllm").port == 443
    assert DnsName.parse("http://vllm:8000") is None
    assert DnsName.parse("dns+http://vllm:8000/v1") is None


@pytest.mark.anyio
async def test_the_system_resolver_resolves_localhost_to_loopback():
    addresses = await system_resolver("localhost", 8000)
    assert "127.0.0.1" in addresses or "::1" in addresses


async def chat(gateway, model: str) -> httpx.Response:
    async with gateway.client(GLOBEX_KEY) as client:
        return await client.post(CHAT, json={"model": model, "messages": MESSAGES})


def placements(gateway) -> dict[str, list[str]]:
    return {entry.name: gateway.registry.loaded_on(entry) for entry in gateway.registry.entries()}


@pytest.mark.anyio
async def test_each_adapter_is_loaded_on_one_replica_under_skewed_traffic(tmp_path, llama_base,
                                                                          demo, store_dir):
    first, second = FakeVllm("http://vllm-a:8000"), FakeVllm("http://vllm-b:8000")
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, first, second)
    for model in ["caps"] * 6 + ["pirate"] * 3 + ["plain"] * 2 + ["caps", "pirate", "base"]:
        assert (await chat(gateway, model)).status_code == 200
    loaded = placements(gateway)
    assert all(len(urls) == 1 for urls in loaded.values()), loaded
    assert {url for urls in loaded.values() for url in urls} == {first.url, second.url}
    assert len(first.received(LOAD)) + len(second.received(LOAD)) == 3
    await gateway.pool.aclose()


@pytest.mark.anyio
async def test_a_hot_adapter_spills_to_a_second_replica_when_its_first_is_saturated(
        tmp_path, llama_base, demo, store_dir):
    first, second = FakeVllm("http://vllm-a:8000"), FakeVllm("http://vllm-b:8000")
    for vllm in (first, second):
        vllm.hang_streams = True
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, first, second)
    body = {"model": "caps", "messages": MESSAGES, "stream": True}
    leave = asyncio.Event()
    streams = []
    for count in range(1, 5):
        streams.append(asyncio.create_task(call_asgi(gateway.app, body, GLOBEX_KEY, leave, [])))
        await wait_until(lambda count=count: len(first.streams) + len(second.streams) == count)
        if count == 2:
            placed_first = placements(gateway)["caps"]
    # The bound is ceil(1.25 * (load + 1) / 2): 1, 2, 2, 3 as requests 1-4 arrive. The first
    # two stay on caps's replica; the third finds it at the bound and spills; the fourth
    # finds caps on both and takes the less loaded.
    on_first, on_second = len(first.streams), len(second.streams)
    leave.set()
    await asyncio.gather(*streams)
    assert len(placed_first) == 1
    assert (on_first, on_second) == (2, 2)
    assert sorted(placements(gateway)["caps"]) == [first.url, second.url]
    await wait_until(lambda: all(b.load == 0 for b in gateway.pool.backends))
    await gateway.pool.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(("failure", "requests_reaching_it"), [
    ("down", 1),  # refuses the connection: the retried request never reaches it
    ("drops_completions", 2),  # dies with the request on it: closes without an answer
])
async def test_a_request_whose_replica_fails_is_sent_to_another_and_loads_there(
        tmp_path, llama_base, demo, store_dir, failure, requests_reaching_it):
    first, second = FakeVllm("http://vllm-a:8000"), FakeVllm("http://vllm-b:8000")
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, first, second)
    assert (await chat(gateway, "caps")).status_code == 200
    [home] = placements(gateway)["caps"]
    failing, alive = (first, second) if home == first.url else (second, first)
    setattr(failing, failure, True)
    answer = await chat(gateway, "caps")
    assert answer.status_code == 200, answer.text
    assert len(failing.received("/v1/chat/completions")) == requests_reaching_it
    assert placements(gateway)["caps"] == [alive.url]
    assert gateway.pool.health() == {failing.url: False, alive.url: True}
    await gateway.pool.aclose()


class FakeDns:
    """A name whose addresses a test changes; each address reaches the fake vLLM at
    `http://ADDRESS:8000`."""

    def __init__(self, name: str, *addresses: str) -> None:
        self.name = name
        self.addresses = list(addresses)
        self.failing = False

    async def resolve(self, host: str, port: int) -> list[str]:
        if self.failing or host != self.name:
            raise OSError(f"cannot resolve {host}")
        return list(self.addresses)


@pytest.mark.anyio
async def test_discovery_adds_health_checked_joiners_and_drains_leavers(tmp_path, llama_base,
                                                                        demo, store_dir):
    a, b, c = (FakeVllm(f"http://10.0.0.{n}:8000") for n in (1, 2, 3))
    dns = FakeDns("vllm.test", "10.0.0.1", "10.0.0.2")
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, a, b, c, eager=True,
                                 backends=["dns+http://vllm.test:8000"], resolver=dns.resolve)
    async with gateway.app.router.lifespan_context(gateway.app):
        assert gateway.pool.health() == {a.url: True, b.url: True}
        assert set(a.loaded) == set(b.loaded) == internal_names(gateway) and not c.loaded
        dns.addresses = ["10.0.0.2", "10.0.0.3"]
        c.down = True  # not ready yet: it joins the table but takes no requests
        await refresh(gateway.pool, gateway.registry, eager=True)
        assert gateway.pool.health() == {b.url: True, c.url: False}
        for _ in range(3):
            assert (await chat(gateway, "caps")).status_code == 200
        assert a.received(CHAT) == [] and c.received(CHAT) == []
        c.down = False
        dns.failing = True  # a failed lookup keeps the last answer
        await refresh(gateway.pool, gateway.registry, eager=True)
        assert gateway.pool.health() == {b.url: True, c.url: True}
        assert set(c.loaded) == internal_names(gateway)
    await gateway.pool.aclose()


def internal_names(gateway) -> set[str]:
    return {entry.internal_name for entry in gateway.registry.entries()}


@pytest.mark.anyio
async def test_a_replicas_load_counts_what_vllm_holds_beyond_this_gateway():
    held = {"count": 5}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=f"vllm:num_requests_running 1.0\n"
                                            f"vllm:num_requests_waiting {held['count'] - 1}.0\n")
        return httpx.Response(200)

    pool = BackendPool(["http://vllm-a:8000"],
                       httpx.AsyncClient(transport=httpx.MockTransport(answer)))
    [replica] = pool.backends
    visit = Visit(replica, None)
    await pool.check_health()
    assert (replica.in_flight, replica.foreign_load, replica.load) == (1, 4, 5)
    visit.end()
    held["count"] = 0
    await pool.check_health()
    assert replica.load == 0
    await pool.aclose()
