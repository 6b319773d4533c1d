"""The quota counters: token buckets and period budgets, all-or-nothing charges and settlement,
in memory and in a real Redis (shared by several clients, as gateway replicas share it)."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Awaitable

import anyio
import pytest
from redis.asyncio import Redis

from gateway.engine.process import free_port
from gateway.quota.counters import (
    Counters,
    CounterStoreUnavailable,
    MemoryCounters,
    Outcome,
    Reading,
    Rule,
    RuleKind,
)
from gateway.quota.redis_counters import RedisCounters
from tests.redis_server import RedisServer

pytestmark = pytest.mark.anyio

NOW = 1_796_256_000.0  # 2026-12-03 00:00 UTC
DAY_END = NOW + 86_400


def bucket(cost: int, key: str = "rpm:acme", limit: int = 4, period_s: float = 8.0) -> Rule:
    """A bucket refilling at limit / period_s = 0.5 per second by default (exact floats)."""
    return Rule(key, RuleKind.BUCKET, limit, period_s, cost)


def tokens(cost: int) -> Rule:
    return bucket(cost, key="tpm:acme", limit=64)  # refills 8 per second


def budget(cost: int, key: str = "budget:acme:2026-12-03", period_s: float = 3600.0) -> Rule:
    return Rule(key, RuleKind.BUDGET, 10, period_s, cost)


class Stores:
    """Opens the stores a test uses, the Redis ones in a namespace of the test's own."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        self._namespace = f"test:{uuid.uuid4().hex}:"
        self._opened: list[Counters] = []

    def open(self, kind: str) -> Counters:
        if kind == "memory":
            store: Counters = MemoryCounters()
        else:
            url = self._request.getfixturevalue("redis_server").url
            store = RedisCounters(url, namespace=self._namespace, timeout_s=5)
        self._opened.append(store)
        return store

    async def close(self) -> None:
        for store in self._opened:
            await store.close()


@pytest.fixture
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    opened = Stores(request)
    yield opened
    await opened.close()


@pytest.fixture(params=["memory", "redis"])
def counters(request: pytest.FixtureRequest, stores: Stores) -> Counters:
    return stores.open(request.param)


async def test_fresh_bucket_admits_its_limit_then_refuses(counters: Counters) -> None:
    for remaining in (3, 2, 1, 0):
        assert await counters.charge([bucket(1)], NOW) == Outcome(
            True, (Reading(remaining, (4 - remaining) * 2.0),), None, None)
    assert await counters.charge([bucket(1)], NOW) == Outcome(False, (Reading(0, 8.0),), 0, 2.0)


async def test_bucket_refills_with_time(counters: Counters) -> None:
    assert (await counters.charge([bucket(4)], NOW)).allowed
    assert await counters.charge([bucket(1)], NOW + 1) == Outcome(
        False, (Reading(0, 7.0),), 0, 1.0)
    assert await counters.charge([bucket(1)], NOW + 2) == Outcome(
        True, (Reading(0, 8.0),), None, None)
    assert await counters.charge([bucket(0)], NOW + 100) == Outcome(
        True, (Reading(4, 0.0),), None, None)


async def test_a_clock_going_back_refills_nothing(counters: Counters) -> None:
    assert (await counters.charge([bucket(4)], NOW)).allowed
    assert (await counters.charge([bucket(0)], NOW - 60)).readings == (Reading(0, 8.0),)


async def test_a_refused_rule_leaves_every_rule_unchanged(counters: Counters) -> None:
    charged = (Reading(3, 2.0), Reading(4, 7.5))
    assert await counters.charge([bucket(1), tokens(60)], NOW) == Outcome(
        True, charged, None, None)
    assert await counters.charge([bucket(1), tokens(10)], NOW) == Outcome(
        False, charged, 1, 0.75)
    assert await counters.charge([bucket(0), tokens(0)], NOW) == Outcome(
        True, charged, None, None)
    assert (await counters.charge([budget(8)], NOW)).allowed
    assert await counters.charge([bucket(1), budget(5)], NOW) == Outcome(
        False, (Reading(3, 2.0), Reading(2, 3600.0)), 1, 3600.0)
    assert (await counters.charge([bucket(0)], NOW)).readings == (Reading(3, 2.0),)


async def test_cost_zero_reads_a_fresh_state_without_writing(counters: Counters) -> None:
    peek = [bucket(0), budget(0)]
    expected = Outcome(True, (Reading(4, 0.0), Reading(10, 3600.0)), None, None)
    assert await counters.charge(peek, NOW) == expected
    assert await counters.charge(peek, NOW) == expected


async def test_a_cost_above_the_limit_is_never_admitted(counters: Counters) -> None:
    assert await counters.charge([bucket(5)], NOW) == Outcome(False, (Reading(4, 0.0),), 0, None)
    assert await counters.charge([budget(11)], NOW) == Outcome(
        False, (Reading(10, 3600.0),), 0, None)


async def test_adjust_refunds_up_to_a_full_bucket(counters: Counters) -> None:
    assert (await counters.charge([tokens(40)], NOW)).readings == (Reading(24, 5.0),)
    await counters.adjust([tokens(-30)], NOW)
    assert (await counters.charge([tokens(0)], NOW)).readings == (Reading(54, 1.25),)
    await counters.adjust([tokens(-100)], NOW)
    assert (await counters.charge([tokens(0)], NOW)).readings == (Reading(64, 0.0),)


async def test_adjust_into_debt_refills_later(counters: Counters) -> None:
    assert (await counters.charge([tokens(40)], NOW)).allowed
    await counters.adjust([tokens(56)], NOW)  # 96 used: the level is -32
    assert await counters.charge([tokens(1)], NOW) == Outcome(
        False, (Reading(0, 12.0),), 0, 4.125)
    assert await counters.charge([tokens(1)], NOW + 4.125) == Outcome(
        True, (Reading(0, 8.0),), None, None)


async def test_adjust_a_budget_never_below_zero(counters: Counters) -> None:
    assert (await counters.charge([budget(8)], NOW)).allowed
    await counters.adjust([budget(-5)], NOW)
    assert (await counters.charge([budget(0)], NOW)).readings == (Reading(7, 3600.0),)
    await counters.adjust([budget(-100)], NOW)
    assert (await counters.charge([budget(0)], NOW)).readings == (Reading(10, 3600.0),)
    await counters.adjust([budget(20), bucket(0)], NOW)
    assert await counters.charge([budget(1)], NOW) == Outcome(
        False, (Reading(0, 3600.0),), 0, 3600.0)


async def test_budget_admits_its_total_then_a_new_period_starts_at_zero(
        counters: Counters) -> None:
    for remaining in (6, 2):
        assert await counters.charge([budget(4)], NOW) == Outcome(
            True, (Reading(remaining, 3600.0),), None, None)
    assert await counters.charge([budget(4, period_s=1800.0)], NOW + 1800) == Outcome(
        False, (Reading(2, 1800.0),), 0, 1800.0)
    assert (await counters.charge([budget(2)], NOW)).readings == (Reading(0, 3600.0),)
    tomorrow = budget(4, key="budget:acme:2026-12-04", period_s=86_400.0)
    assert (await counters.charge([tomorrow], DAY_END)).readings == (Reading(6, 86_400.0),)


async def test_rules_are_checked(counters: Counters) -> None:
    with pytest.raises(ValueError, match="distinct keys"):
        await counters.charge([bucket(1), bucket(2)], NOW)
    with pytest.raises(ValueError, match="refunds are adjusts"):
        await counters.charge([bucket(-1)], NOW)
    with pytest.raises(ValueError, match="positive limit"):
        bucket(1, limit=0)


def random_rules(now: float) -> list[Rule]:
    """The five rules of `random_call`, each with cost 0."""
    return [bucket(0, "rpm:a", 10, 60.0), bucket(0, "tpm:a", 1000, 60.0),
            bucket(0, "rpm:b", 7, 3.5), budget(0, "budget:a", DAY_END - now),
            budget(0, "budget:b", DAY_END - now)]


def random_call(rng: random.Random, now: float) -> tuple[str, list[Rule]]:
    """A charge or an adjust of 1 to 3 of five rules, with costs around their limits."""
    rules = random_rules(now)
    kind = rng.choice(["charge", "charge", "adjust"])
    low = 0 if kind == "charge" else -1
    chosen = rng.sample(rules, rng.randint(1, 3))
    return kind, [Rule(rule.key, rule.kind, rule.limit, rule.period_s,
                       rng.randint(low * rule.limit, rule.limit * 6 // 10 + 1))
                  for rule in chosen]


async def test_memory_and_redis_agree_on_a_random_sequence(stores: Stores) -> None:
    memory, redis = stores.open("memory"), stores.open("redis")
    rng = random.Random(20261203)
    now = NOW
    for _ in range(200):
        now += rng.choice([0.0, 0.1, 0.5, 1.0, 3.0, 7.25])
        kind, rules = random_call(rng, now)
        if kind == "charge":
            assert await memory.charge(rules, now) == await redis.charge(rules, now)
        else:
            await memory.adjust(rules, now)
            await redis.adjust(rules, now)


async def test_memory_forgets_expired_state() -> None:
    counters = MemoryCounters()
    await counters.charge([bucket(1), budget(1)], NOW)
    await counters.charge([bucket(0, key="other")], NOW + 3600 + 3600)
    assert counters._states == {}


async def test_an_unreachable_redis_is_reported_without_its_password() -> None:
    port = free_port()  # nothing listens there
    counters = RedisCounters(f"redis://:secret@127.0.0.1:{port}/0")
    with anyio.fail_after(10):  # a retry with backoff would take longer
        with pytest.raises(CounterStoreUnavailable) as raised:
            await counters.ping()
        with pytest.raises(CounterStoreUnavailable):
            await counters.charge([bucket(1)], NOW)
    await counters.close()
    assert f"redis://127.0.0.1:{port}/0" in str(raised.value)
    assert "secret" not in str(raised.value)


async def test_replicas_share_one_limit(stores: Stores) -> None:
    first, second = stores.open("redis"), stores.open("redis")
    assert (await first.charge([bucket(3)], NOW)).allowed
    assert await second.charge([bucket(2)], NOW) == Outcome(False, (Reading(1, 6.0),), 0, 2.0)
    await second.adjust([bucket(-3)], NOW)
    assert (await first.charge([bucket(0)], NOW)).readings == (Reading(4, 0.0),)


@pytest.mark.parametrize("rule", [bucket(1, limit=20, period_s=60.0), budget(1)],
                         ids=["bucket", "budget"])
async def test_concurrent_charges_through_two_clients_admit_exactly_the_limit(
        stores: Stores, rule: Rule) -> None:
    clients = [stores.open("redis"), stores.open("redis")]
    outcomes = await asyncio.gather(*(clients[index % 2].charge([rule], NOW)
                                      for index in range(60)))
    assert sum(outcome.allowed for outcome in outcomes) == rule.limit


async def test_redis_keys_expire_once_they_no_longer_matter(redis_server: RedisServer) -> None:
    namespace = f"test:{uuid.uuid4().hex}:"
    counters = RedisCounters(redis_server.url, namespace=namespace, timeout_s=5)
    await counters.charge([tokens(40), budget(1)], NOW)
    await counters.adjust([tokens(124)], NOW)  # the level is -100: full again in 20.5 s
    await counters.charge([bucket(1)], NOW)
    await counters.close()
    client = Redis.from_url(redis_server.url)
    ttls = [await client.ttl(namespace + key)
            for key in ("rpm:acme", "tpm:acme", "budget:acme:2026-12-03")]
    await client.aclose()
    assert 0 < ttls[0] <= 16  # twice the period
    assert 16 < ttls[1] <= 22  # the debt's refill, rounded up, plus one
    assert 7000 < ttls[2] <= 7200  # the period and an hour


async def evalsha_calls(redis_server: RedisServer) -> int:
    """How many EVALSHA the server has run so far (every client's)."""
    client = Redis.from_url(redis_server.url)
    stats = await client.info("commandstats")
    await client.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_concurrent_charges_through_one_client_go_in_few_script_calls(
        stores: Stores, redis_server: RedisServer) -> None:
    counters = stores.open("redis")
    rule = bucket(1, limit=50, period_s=60.0)
    before = await evalsha_calls(redis_server)
    outcomes = await asyncio.gather(*(counters.charge([rule], NOW) for _ in range(200)))
    calls = await evalsha_calls(redis_server) - before
    assert [outcome.allowed for outcome in outcomes] == [True] * 50 + [False] * 150
    assert [outcome.readings[0].remaining for outcome in outcomes[:50]] == list(range(49, -1, -1))
    assert 1 <= calls <= 10  # one alone, then batches of up to 64 (and a reload if evicted)


async def test_concurrent_calls_through_one_client_apply_in_arrival_order(
        stores: Stores) -> None:
    memory, redis = stores.open("memory"), stores.open("redis")
    rng = random.Random(20261204)
    now = NOW
    calls = []
    for _ in range(300):
        now += rng.choice([0.0, 0.0, 0.1, 0.5, 2.0])
        calls.append((now, *random_call(rng, now)))

    def send(counters: Counters, now: float, kind: str, rules: list[Rule]
             ) -> Awaitable[Outcome | None]:
        return counters.charge(rules, now) if kind == "charge" else counters.adjust(rules, now)

    batched = await asyncio.gather(*(send(redis, *call) for call in calls))
    sequential = [await send(memory, *call) for call in calls]
    assert batched == sequential
    assert sum(outcome is not None and not outcome.allowed for outcome in batched) > 10
    assert await redis.charge(random_rules(now), now) == await memory.charge(
        random_rules(now), now)


async def test_every_caller_of_a_failed_batch_is_told_and_later_calls_work() -> None:
    server = RedisServer()  # not started yet: nothing listens on its port
    counters = RedisCounters(server.url, timeout_s=5)
    try:
        with anyio.fail_after(20):
            failed = await asyncio.gather(*(counters.charge([bucket(1)], NOW)
                                            for _ in range(20)), return_exceptions=True)
            assert all(isinstance(error, CounterStoreUnavailable) for error in failed)
            with pytest.raises(CounterStoreUnavailable):
                await counters.adjust([bucket(-1)], NOW)
            server.start()
            outcomes = await asyncio.gather(*(counters.charge([bucket(1)], NOW)
                                              for _ in range(6)))
            assert [outcome.allowed for outcome in outcomes] == [True] * 4 + [False] * 2
    finally:
        await counters.close()
        server.remove()


async def test_a_cancelled_caller_leaves_the_others_served(stores: Stores) -> None:
    counters = stores.open("redis")
    rule = bucket(1, limit=100, period_s=60.0)
    tasks = [asyncio.create_task(counters.charge([rule], NOW)) for _ in range(40)]
    cancelled = set()
    for index in range(0, 40, 4):  # at different moments: still waiting, or sent already
        await asyncio.sleep(0)
        if tasks[index].cancel():
            cancelled.add(index)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert cancelled
    for index, result in enumerate(results):
        if index in cancelled:
            assert isinstance(result, asyncio.CancelledError)
        else:
            assert isinstance(result, Outcome) and result.allowed
    served = 40 - len(cancelled)
    more = await asyncio.gather(*(counters.charge([rule], NOW) for _ in range(10)))
    assert all(outcome.allowed for outcome in more)
    remaining = (await counters.charge([bucket(0, "rpm:acme", 100, 60.0)], NOW)).readings[0]
    # a cancelled caller's charge may or may not have been applied, as a lost reply's
    assert 100 - served - 10 - len(cancelled) <= remaining.remaining <= 100 - served - 10
