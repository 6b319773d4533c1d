"""Counters in Redis, shared by every gateway replica, so a tenant has one limit across them.

One Lua script reads, checks and writes all the rules of a call atomically in one round trip,
with the caller's clock (`now`), never Redis's TIME. It mirrors `MemoryCounters` step for step
(the same float operations in the same order), and returns each rule's value, from which
Python computes the readings with the code the memory store uses.

Calls are batched: while one script call is in flight, further `charge` and `adjust` calls
wait in a queue, and when it returns, everything waiting (up to MAX_BATCH calls) goes in one
script call, which applies them one after the other in arrival order, each exactly as if sent
alone. A call made while nothing is in flight is sent at once (no timer), so without
concurrency each call is one round trip, as before; under load, one round trip (and one pass
through redis-py) carries many calls.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.quota.counters import (
    BUDGET_GRACE_S,
    CounterStoreUnavailable,
    Outcome,
    Rule,
    check_rules,
    outcome,
)

T = TypeVar("T")

MAX_BATCH = 64  # calls per script call at most

# A batch of calls, one after the other. KEYS: each call's keys, one per rule, call after call.
# ARGV, per call: mode ("charge" or "adjust"), now, the number of rules, then per rule: kind,
# limit, period_s, cost. Replies one reply per call, in order: {refused: 1-based index, 0 when
# allowed; then each rule's value}, the values as "%.17g" strings: Redis truncates Lua numbers
# to integers, and 17 digits round-trip. Each call reads the state that the calls before it
# wrote, so calls of one batch may share keys.
SCRIPT = """
local function current(key, rule, now)
  if rule.kind == 'budget' then
    return tonumber(redis.call('GET', key) or '0')
  end
  local state = redis.call('HMGET', key, 'level', 'ts')
  if not state[1] then
    return rule.limit
  end
  local elapsed = math.max(0, now - tonumber(state[2]))
  return math.min(rule.limit, tonumber(state[1]) + elapsed * rule.rate)
end

local function admits(rule, value)
  if rule.cost == 0 then
    return true
  elseif rule.kind == 'budget' then
    return value + rule.cost <= rule.limit
  end
  return value >= rule.cost
end

local function settled(rule, value)
  if rule.kind == 'budget' then
    return math.max(0, value + rule.cost)
  end
  return math.min(rule.limit, value - rule.cost)
end

local function write(key, rule, value, now_text)
  if rule.kind == 'budget' then
    redis.call('SET', key, string.format('%.17g', value), 'EX',
               math.ceil(rule.period) + BUDGET_GRACE_S)
    return
  end
  local ttl = math.ceil(rule.period * 2)
  if value < 0 then
    ttl = math.ceil((rule.limit - value) / rule.rate) + 1
  end
  redis.call('HSET', key, 'level', string.format('%.17g', value), 'ts', now_text)
  redis.call('EXPIRE', key, ttl)
end

-- One call: a charge (all rules or none) or an adjust (unconditional); returns its reply.
local function apply(charging, now_text, keys, rules)
  local now = tonumber(now_text)
  local values = {}
  for i, rule in ipairs(rules) do
    values[i] = current(keys[i], rule, now)
  end
  local reply = {0}
  if charging then
    for i, rule in ipairs(rules) do
      if not admits(rule, values[i]) then
        reply[1] = i
        break
      end
    end
  end
  if reply[1] == 0 then
    for i, rule in ipairs(rules) do
      if rule.cost ~= 0 then
        values[i] = settled(rule, values[i])
        write(keys[i], rule, values[i], now_text)
      end
    end
  end
  for i, value in ipairs(values) do
    reply[i + 1] = string.format('%.17g', value)
  end
  return reply
end

local replies = {}
local at, next_key = 1, 1
while at <= #ARGV do
  local charging, now_text, count = ARGV[at] == 'charge', ARGV[at + 1], tonumber(ARGV[at + 2])
  at = at + 3
  local keys, rules = {}, {}
  for i = 1, count do
    local limit, period = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
    keys[i] = KEYS[next_key]
    rules[i] = {kind = ARGV[at], limit = limit, period = period, rate = limit / period,
                cost = tonumber(ARGV[at + 3])}
    at, next_key = at + 4, next_key + 1
  end
  replies[#replies + 1] = apply(charging, now_text, keys, rules)
end
return replies
""".replace("BUDGET_GRACE_S", str(BUDGET_GRACE_S))


@dataclass
class _Call:
    """One `charge` or `adjust` waiting to be sent, and where its reply goes."""

    mode: str
    rules: Sequence[Rule]
    now: float
    reply: asyncio.Future[list[Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class RedisCounters:
    """Counters in the Redis at `url`, under `namespace`; one client (a connection pool) for
    every call. A call that cannot reach Redis within `timeout_s` raises
    CounterStoreUnavailable; it is not retried, since a script whose reply was lost may have
    charged already. Calls are batched (see the module's docstring): when a script call fails,
    every call of its batch raises CounterStoreUnavailable."""

    def __init__(self, url: str, *, namespace: str = "dora-gateway:quota:",
                 timeout_s: float = 0.25) -> None:
        self._where = _without_password(url)
        self._namespace = namespace
        self._client = Redis.from_url(url, socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self._script = self._client.register_script(SCRIPT)
        self._waiting: deque[_Call] = deque()  # calls not yet sent, in arrival order
        self._sender: asyncio.Task[None] | None = None  # sends batches while calls wait

    async def charge(self, rules: Sequence[Rule], now: float) -> Outcome:
        check_rules(rules, charging=True)
        refused, *values = await self._run("charge", rules, now)
        return outcome(rules, [float(value) for value in values],
                       int(refused) - 1 if refused else None)

    async def adjust(self, rules: Sequence[Rule], now: float) -> None:
        check_rules(rules, charging=False)
        changes = [rule for rule in rules if rule.cost != 0]
        if changes:
            await self._run("adjust", changes, now)

    async def ping(self) -> None:
        await self._guard(self._client.ping())

    async def close(self) -> None:
        if self._sender is not None:  # let the calls already made be sent
            await asyncio.wait({self._sender})
        await self._client.aclose()

    async def _run(self, mode: str, rules: Sequence[Rule], now: float) -> list[Any]:
        """Queue the call, start the sender if none runs (it sends at once then), and wait
        for the call's reply.

        A caller cancelled while it waits leaves the batching intact: its call is dropped if
        not yet sent, else its reply is discarded; so it may or may not have been applied, as
        a call whose reply was lost."""
        call = _Call(mode, rules, now)
        self._waiting.append(call)
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_batches())
        try:
            return await call.reply
        except asyncio.CancelledError:
            if call.reply.done() and not call.reply.cancelled():
                call.reply.exception()  # retrieved: no "never retrieved" warning
            raise

    async def _send_batches(self) -> None:
        """Send what waits, MAX_BATCH calls at a time, until nothing waits."""
        batch: list[_Call] = []
        try:
            while self._waiting:
                batch = self._next_batch()
                if batch:
                    await self._send(batch)
                batch = []
        except BaseException as error:  # cancelled (the loop is closing), or a bug: tell all
            for call in [*batch, *self._waiting]:
                if not call.reply.done():
                    call.reply.set_exception(CounterStoreUnavailable(
                        f"quota counter store {self._where}: the call was not sent: {error!r}"))
            self._waiting.clear()
            raise
        finally:
            self._sender = None

    def _next_batch(self) -> list[_Call]:
        """The oldest waiting calls, up to MAX_BATCH, skipping those whose caller left."""
        batch: list[_Call] = []
        while self._waiting and len(batch) < MAX_BATCH:
            call = self._waiting.popleft()
            if not call.reply.done():
                batch.append(call)
        return batch

    async def _send(self, batch: list[_Call]) -> None:
        """One script call for `batch`; each call's reply (or error) goes to its caller."""
        keys: list[str] = []
        args: list[str | int | float] = []
        for call in batch:
            keys += [self._namespace + rule.key for rule in call.rules]
            args += [call.mode, call.now, len(call.rules)]
            for rule in call.rules:
                args += [str(rule.kind), rule.limit, rule.period_s, rule.cost]
        try:
            replies = await self._script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as error:
            for call in batch:
                if not call.reply.done():
                    call.reply.set_exception(self._unavailable(error))
            return
        except Exception as error:  # not the store's fault: each caller gets it as it is
            for call in batch:
                if not call.reply.done():
                    call.reply.set_exception(error)
            return
        for call, reply in zip(batch, replies, strict=True):
            if not call.reply.done():
                call.reply.set_result(reply)

    async def _guard(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except (RedisError, OSError, TimeoutError) as error:
            raise self._unavailable(error) from error

    def _unavailable(self, error: BaseException) -> CounterStoreUnavailable:
        unavailable = CounterStoreUnavailable(
            f"quota counter store {self._where} unavailable: {error}")
        unavailable.__cause__ = error
        return unavailable


def _without_password(url: str) -> str:
    """`url` without its credentials, for messages and logs."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
