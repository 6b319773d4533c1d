"""The quota guard in front of vLLM, at a frozen clock: what `admit` charges and answers
(OpenAI's x-ratelimit-* headers, 429s with Retry-After), the budget's calendar periods, the
settlement of a finished request, and what happens when the counter store is unreachable;
in memory and in a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import pytest

from gateway.engine.process import free_port
from gateway.errors import LimitExceeded, LimitsUnavailable, QuotaSpent
from gateway.quota.counters import (
    Counters,
    CounterStoreUnavailable,
    MemoryCounters,
    Outcome,
    Rule,
)
from gateway.quota.guard import Quota, duration_text, tokens_used
from gateway.quota.policy import BudgetPeriod, LimitName, TenantLimits, period_bounds
from gateway.quota.redis_counters import RedisCounters
from gateway.telemetry.records import AdapterType, RequestRecord

pytestmark = pytest.mark.anyio


def utc(*moment: int, second: float = 0.0) -> float:
    """Unix seconds of a UTC date and time (datetime's arithmetic, not the code under test)."""
    return datetime(*moment, tzinfo=UTC).timestamp() + second


NOW = utc(2026, 12, 3)
DAY_END = utc(2026, 12, 4)
# 1 request and 20 tokens refill per second (exact floats).
ACME = TenantLimits(requests_per_minute=60, tokens_per_minute=1200, token_budget=10_000)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Flaky(MemoryCounters):
    """Memory counters that count their calls and can be taken down (`down = True`)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise CounterStoreUnavailable("down for the test")

    async def charge(self, rules: Sequence[Rule], now: float) -> Outcome:
        self._call("charge")
        return await super().charge(rules, now)

    async def adjust(self, rules: Sequence[Rule], now: float) -> None:
        self._call("adjust")
        for _ in range(3):  # a settlement that takes a few loop turns, like a network call
            await asyncio.sleep(0)
        await super().adjust(rules, now)

    async def ping(self) -> None:
        self._call("ping")

    async def close(self) -> None:
        self.calls.append("close")
        await super().close()


class Quotas:
    """Builds the quotas a test uses over its store, Redis ones in a namespace of their own."""

    def __init__(self, request: pytest.FixtureRequest | None, kind: str) -> None:
        self._request = request
        self.kind = kind
        self.clock = Clock()
        self.refusals: list[tuple[str, LimitName]] = []
        self._opened: list[Quota] = []

    def counters(self) -> Counters:
        if self.kind == "memory":
            return MemoryCounters()
        assert self._request is not None
        url = self._request.getfixturevalue("redis_server").url
        return RedisCounters(url, namespace=f"test:{uuid.uuid4().hex}:", timeout_s=5)

    def open(self, limits: dict[str, TenantLimits] | None = None, *,
             counters: Counters | None = None, fail_open: bool = True) -> Quota:
        table = {"acme": ACME} if limits is None else limits
        quota = Quota(counters or self.counters(),
                      lambda tenant: table.get(tenant, TenantLimits()), fail_open=fail_open,
                      clock=self.clock,
                      on_refusal=lambda tenant, limit: self.refusals.append((tenant, limit)))
        self._opened.append(quota)
        return quota

    async def close(self) -> None:
        for quota in self._opened:
            await quota.aclose()


@pytest.fixture(params=["memory", "redis"])
async def quotas(request: pytest.FixtureRequest) -> AsyncIterator[Quotas]:
    opened = Quotas(request, request.param)
    yield opened
    await opened.close()


@pytest.fixture
async def local() -> AsyncIterator[Quotas]:
    """Quotas whose store does not matter to the test (or is given by it)."""
    opened = Quotas(None, "memory")
    yield opened
    await opened.close()


def record(status: int = 200, *, prompt: int | None = None, completion: int | None = None,
           chunks: int = 0) -> RequestRecord:
    return RequestRecord("acme", "base", AdapterType.BASE, started=0.0, finished=1.0,
                         upstream_seconds=1.0, status=status, prompt_tokens=prompt,
                         completion_tokens=completion, text_chunks=chunks)


def remaining(standing: dict[str, dict] | None) -> dict[str, int]:
    assert standing is not None
    return {name: limit["remaining"] for name, limit in standing.items()}


async def test_admit_charges_a_request_and_its_token_estimate(quotas: Quotas) -> None:
    quota = quotas.open()
    first = await quota.admit("acme", prompt_estimate=100, output_cap=200)
    assert first.headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1200", "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "15s"}
    quotas.clock.now = NOW + 0.5  # refills 0.5 requests and 10 tokens
    second = await quota.admit("acme", prompt_estimate=50, output_cap=0)
    assert second.headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "58",
        "x-ratelimit-reset-requests": "2s",  # 1.5 s, rounded up
        "x-ratelimit-limit-tokens": "1200", "x-ratelimit-remaining-tokens": "860",
        "x-ratelimit-reset-tokens": "17s"}
    assert await quota.standing("acme") == {
        "requests": {"limit": 60, "remaining": 58, "reset_seconds": 1.5},
        "tokens": {"limit": 1200, "remaining": 860, "reset_seconds": 17.0},
        "budget": {"limit": 10_000, "remaining": 9650, "reset_seconds": 86_399.5}}


async def test_a_tenant_without_limits_gets_no_headers_and_no_store_call(
        local: Quotas) -> None:
    counters = Flaky()
    quota = local.open(counters=counters)
    charge = await quota.admit("nobody", prompt_estimate=100, output_cap=100)
    quota.settle(charge, record(prompt=10, completion=10))
    quota.refund(charge)
    await quota.settled()
    assert charge.headers == {}
    assert await quota.standing("nobody") == {}
    assert counters.calls == []


async def test_standing_reads_without_charging(quotas: Quotas) -> None:
    quota = quotas.open()
    fresh = {"requests": {"limit": 60, "remaining": 60, "reset_seconds": 0.0},
             "tokens": {"limit": 1200, "remaining": 1200, "reset_seconds": 0.0},
             "budget": {"limit": 10_000, "remaining": 10_000, "reset_seconds": 86_400.0}}
    assert await quota.standing("acme") == fresh
    assert await quota.standing("acme") == fresh
    charge = await quota.admit("acme", prompt_estimate=1, output_cap=0)
    assert charge.headers["x-ratelimit-remaining-requests"] == "59"


async def test_the_first_refusing_limit_raises_and_nothing_is_charged(quotas: Quotas) -> None:
    quota = quotas.open()
    await quota.admit("acme", prompt_estimate=1000, output_cap=100)  # 100 tokens left
    quotas.clock.now = NOW + 0.25  # 105 tokens, 59.25 requests
    with pytest.raises(LimitExceeded) as raised:
        await quota.admit("acme", prompt_estimate=100, output_cap=300)
    error = raised.value
    assert (error.status, error.error_type, error.code) == (
        429, "rate_limit_error", "rate_limit_exceeded")
    assert error.headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "750ms",
        "x-ratelimit-limit-tokens": "1200", "x-ratelimit-remaining-tokens": "105",
        "x-ratelimit-reset-tokens": "55s",  # 54.75 s
        "Retry-After": "15", "retry-after-ms": "14750"}  # (400 - 105) / 20 tokens per second
    assert quotas.refusals == [("acme", LimitName.TOKENS)]
    assert remaining(await quota.standing("acme")) == {
        "requests": 59, "tokens": 105, "budget": 8900}


async def test_requests_are_checked_before_tokens(quotas: Quotas) -> None:
    quota = quotas.open({"acme": TenantLimits(requests_per_minute=2, tokens_per_minute=600)})
    for _ in range(2):
        await quota.admit("acme", prompt_estimate=100, output_cap=100)
    quotas.clock.now = NOW + 6  # a fifth of a request and 60 tokens refilled
    with pytest.raises(LimitExceeded, match="requests per minute") as raised:
        await quota.admit("acme", prompt_estimate=200, output_cap=300)  # too many tokens too
    assert (raised.value.headers["Retry-After"], raised.value.headers["retry-after-ms"]) == (
        "24", "24000")
    assert quotas.refusals == [("acme", LimitName.REQUESTS)]
    assert remaining(await quota.standing("acme")) == {"requests": 0, "tokens": 260}


async def test_a_request_above_its_tokens_capacity_is_never_admitted(quotas: Quotas) -> None:
    quota = quotas.open()
    with pytest.raises(LimitExceeded, match="lower max_tokens") as raised:
        await quota.admit("acme", prompt_estimate=1000, output_cap=201)
    assert raised.value.status == 429
    assert raised.value.headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "60",
        "x-ratelimit-reset-requests": "0ms",
        "x-ratelimit-limit-tokens": "1200", "x-ratelimit-remaining-tokens": "1200",
        "x-ratelimit-reset-tokens": "0ms", "x-should-retry": "false"}
    assert remaining(await quota.standing("acme")) == {
        "requests": 60, "tokens": 1200, "budget": 10_000}


async def test_a_spent_budget_refuses_until_the_next_day(quotas: Quotas) -> None:
    quota = quotas.open({"acme": TenantLimits(token_budget=1000)})
    quotas.clock.now = NOW + 72_000.5  # 20:00:00.5, 14399.5 s before the day ends
    for _ in range(2):
        assert (await quota.admit("acme", prompt_estimate=400, output_cap=100)).headers == {}
    with pytest.raises(QuotaSpent) as raised:
        await quota.admit("acme", prompt_estimate=1, output_cap=0)
    error = raised.value
    assert (error.status, error.error_type, error.code) == (
        429, "insufficient_quota", "insufficient_quota")
    assert error.headers == {"Retry-After": "14400", "retry-after-ms": "14399500",
                             "x-should-retry": "false"}
    assert quotas.refusals == [("acme", LimitName.BUDGET)]
    quotas.clock.now = DAY_END - 0.001
    with pytest.raises(QuotaSpent):
        await quota.admit("acme", prompt_estimate=1, output_cap=0)
    quotas.clock.now = DAY_END
    await quota.admit("acme", prompt_estimate=1000, output_cap=0)
    assert remaining(await quota.standing("acme")) == {"budget": 0}


@pytest.mark.parametrize(("last_moment", "next_month"), [
    (utc(2026, 12, 31, 23, 59, 59), utc(2027, 1, 1)),
    (utc(2028, 2, 29, 12), utc(2028, 3, 1)),
    (utc(2027, 2, 28, 12), utc(2027, 3, 1)),
], ids=["december", "leap-february", "february"])
async def test_a_monthly_budget_is_whole_again_in_the_next_month(
        quotas: Quotas, last_moment: float, next_month: float) -> None:
    quota = quotas.open({"acme": TenantLimits(token_budget=1000,
                                              budget_period=BudgetPeriod.MONTH)})
    quotas.clock.now = last_moment
    await quota.admit("acme", prompt_estimate=600, output_cap=400)
    with pytest.raises(QuotaSpent) as raised:
        await quota.admit("acme", prompt_estimate=1, output_cap=0)
    assert raised.value.headers["Retry-After"] == str(int(next_month - last_moment))
    quotas.clock.now = next_month
    await quota.admit("acme", prompt_estimate=600, output_cap=400)
    assert remaining(await quota.standing("acme")) == {"budget": 0}


@pytest.mark.parametrize(("period", "now", "bounds"), [
    (BudgetPeriod.DAY, utc(2026, 12, 3, 15, 30, second=0.5), (NOW, DAY_END)),
    (BudgetPeriod.DAY, NOW, (NOW, DAY_END)),
    (BudgetPeriod.DAY, NOW - 0.001, (utc(2026, 12, 2), NOW)),
    (BudgetPeriod.MONTH, utc(2026, 12, 31, 23, 59, 59, second=0.5),
     (utc(2026, 12, 1), utc(2027, 1, 1))),
    (BudgetPeriod.MONTH, utc(2027, 1, 1), (utc(2027, 1, 1), utc(2027, 2, 1))),
    (BudgetPeriod.MONTH, utc(2028, 2, 29, 23), (utc(2028, 2, 1), utc(2028, 3, 1))),
    (BudgetPeriod.MONTH, utc(2027, 2, 14), (utc(2027, 2, 1), utc(2027, 3, 1))),
    (BudgetPeriod.MONTH, utc(2027, 4, 30, 23), (utc(2027, 4, 1), utc(2027, 5, 1))),
], ids=["day", "day-start", "day-before", "december", "january", "leap-february", "february",
        "april"])
def test_period_bounds(period: BudgetPeriod, now: float, bounds: tuple[float, float]) -> None:
    assert period_bounds(period, now) == bounds


@pytest.mark.parametrize(("finished", "used"), [
    (record(prompt=90, completion=40), 130),
    (record(prompt=250, completion=150), 400),  # more than the estimate: charged more
    (record(prompt=90), 90),
    (record(499, chunks=7), 107),  # an aborted stream: the prompt estimate and its chunks
    (record(499), 100),
    (record(502, chunks=5), 105),
    (record(400), 0),  # an error before generation: no tokens
    (record(502), 0),
], ids=["usage", "above-estimate", "prompt-only", "aborted", "aborted-early", "cut-off",
        "invalid", "backend-error"])
async def test_settle_charges_what_the_request_used(
        quotas: Quotas, finished: RequestRecord, used: int) -> None:
    quota = quotas.open()
    charge = await quota.admit("acme", prompt_estimate=100, output_cap=200)
    quota.settle(charge, finished)
    await quota.settled()
    assert remaining(await quota.standing("acme")) == {
        "requests": 59, "tokens": 1200 - used, "budget": 10_000 - used}


async def test_refund_takes_back_the_whole_charge(quotas: Quotas) -> None:
    quota = quotas.open()
    kept = await quota.admit("acme", prompt_estimate=10, output_cap=20)
    refunded = await quota.admit("acme", prompt_estimate=100, output_cap=200)
    quota.refund(refunded)
    await quota.settled()
    assert kept.headers["x-ratelimit-remaining-tokens"] == "1170"
    assert remaining(await quota.standing("acme")) == {
        "requests": 59, "tokens": 1170, "budget": 9970}


async def test_aclose_waits_for_pending_settlements(local: Quotas) -> None:
    counters = Flaky()
    quota = local.open(counters=counters)
    charge = await quota.admit("acme", prompt_estimate=100, output_cap=200)
    quota.settle(charge, record(prompt=10, completion=10))
    await quota.aclose()
    assert counters.calls == ["charge", "adjust", "close"]


async def test_settlements_waiting_together_go_to_the_store_in_one_call(quotas: Quotas) -> None:
    """Under load, requests finish faster than the store answers: what waits is summed per
    counter and sent in one call, not one call per request."""
    counters = Flaky() if quotas.kind == "memory" else quotas.counters()
    quota = quotas.open(counters=counters)
    charges = [await quota.admit("acme", prompt_estimate=10, output_cap=20) for _ in range(5)]
    for used, charge in enumerate(charges):
        quota.settle(charge, record(prompt=used, completion=used))
    await quota.settled()
    if isinstance(counters, Flaky):
        assert counters.calls == ["charge"] * 5 + ["adjust"]
    used = sum(2 * index for index in range(5))
    assert remaining(await quota.standing("acme")) == {
        "requests": 55, "tokens": 1200 - used, "budget": 10_000 - used}


def closed_port_counters() -> RedisCounters:
    return RedisCounters(f"redis://127.0.0.1:{free_port()}/0", timeout_s=2)  # nobody listens


async def test_fail_open_lets_requests_through_unlimited(local: Quotas) -> None:
    quota = local.open(counters=closed_port_counters())
    for _ in range(2):
        charge = await quota.admit("acme", prompt_estimate=100, output_cap=200)
        assert charge.headers == {}
    assert await quota.standing("acme") is None
    await quota.check_store()
    assert (quota.health.reachable, quota.health.unlimited_requests,
            quota.health.refused_requests) == (False, 2, 0)


async def test_fail_closed_refuses_with_503(local: Quotas) -> None:
    quota = local.open(counters=closed_port_counters(), fail_open=False)
    with pytest.raises(LimitsUnavailable) as raised:
        await quota.admit("acme", prompt_estimate=100, output_cap=200)
    assert (raised.value.status, raised.value.code) == (503, "limits_unavailable")
    assert raised.value.headers == {"Retry-After": "1"}
    assert await quota.standing("acme") is None  # the admin view still answers
    assert (quota.health.reachable, quota.health.unlimited_requests,
            quota.health.refused_requests) == (False, 0, 1)


async def test_a_tenant_without_limits_is_served_while_the_store_is_down(
        local: Quotas) -> None:
    quota = local.open(counters=closed_port_counters(), fail_open=False)
    assert (await quota.admit("nobody", prompt_estimate=1, output_cap=1)).headers == {}
    assert (quota.health.reachable, quota.health.refused_requests) == (True, 0)


async def test_check_store_sees_a_working_store_again(quotas: Quotas) -> None:
    quota = quotas.open()
    quota.health.reachable = False  # as after an outage
    await quota.check_store()
    assert quota.health.reachable is True


async def test_a_request_let_through_unchecked_is_not_settled(local: Quotas) -> None:
    counters = Flaky()
    quota = local.open(counters=counters)
    await quota.admit("acme", prompt_estimate=100, output_cap=200)
    counters.down = True
    unchecked = await quota.admit("acme", prompt_estimate=1000, output_cap=100)
    await quota.check_store()
    assert quota.health.reachable is False
    counters.down = False
    quota.settle(unchecked, record(prompt=10, completion=10))  # it charged nothing to take back
    quota.refund(unchecked)
    await quota.settled()
    await quota.check_store()
    assert quota.health.reachable is True
    assert remaining(await quota.standing("acme")) == {
        "requests": 59, "tokens": 900, "budget": 9700}


async def test_a_settlement_while_the_store_is_down_marks_it_unreachable(
        local: Quotas) -> None:
    counters = Flaky()
    quota = local.open(counters=counters)
    charge = await quota.admit("acme", prompt_estimate=100, output_cap=200)
    counters.down = True
    quota.settle(charge, record(prompt=10, completion=10))
    await quota.settled()
    assert quota.health.reachable is False
    counters.down = False
    assert remaining(await quota.standing("acme")) == {
        "requests": 59, "tokens": 900, "budget": 9700}
    assert quota.health.reachable is True


@pytest.mark.parametrize(("seconds", "text"), [
    (-1.0, "0ms"), (0.0, "0ms"), (0.02, "20ms"), (0.0201, "21ms"), (0.75, "750ms"),
    (0.9995, "1s"), (1.0, "1s"), (1.2, "2s"), (59.0, "59s"), (59.5, "1m0s"), (60.0, "1m0s"),
    (360.0, "6m0s"), (3599.0, "59m59s"), (3600.0, "1h0m0s"), (3723.0, "1h2m3s"),
    (86_400.0, "24h0m0s"),
])
def test_duration_text(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text


@pytest.mark.parametrize(("finished", "used"), [
    (record(prompt=12, completion=30), 42),
    (record(prompt=12, completion=30, chunks=99), 42),  # vLLM's count wins over chunks
    (record(prompt=12), 12),
    (record(prompt=0, completion=0), 0),
    (record(499), 50),
    (record(499, chunks=3), 53),
    (record(200, chunks=4), 54),
    (record(504, chunks=2), 52),
    (record(400), 0),
    (record(502), 0),
])
def test_tokens_used(finished: RequestRecord, used: int) -> None:
    assert tokens_used(finished, prompt_estimate=50) == used
