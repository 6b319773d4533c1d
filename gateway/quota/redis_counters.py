"""Counters in Redis, shared by every gateway replica, so a tenant has one limit across them.

One Lua script reads, checks and writes all the rules of a call atomically in one round trip,
with the caller's clock (`now`), never Redis's TIME. It mirrors `MemoryCounters` step for step
(the same float operations in the same order), and returns each rule's value, from which
Python computes the readings with the code the memory store uses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
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

# KEYS: one per rule. ARGV: mode ("charge" or "adjust"), now, then per rule: kind, limit,
# period_s, cost. Replies {refused: 1-based index, 0 when allowed; then each rule's value}, the
# values as "%.17g" strings: Redis truncates Lua numbers to integers, and 17 digits round-trip.
SCRIPT = """
local charging = ARGV[1] == 'charge'
local now = tonumber(ARGV[2])
local rules, values = {}, {}

local function current(key, rule)
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

local function write(key, rule, value)
  if rule.kind == 'budget' then
    redis.call('SET', key, string.format('%.17g', value), 'EX',
               math.ceil(rule.period) + BUDGET_GRACE_S)
    return
  end
  local ttl = math.ceil(rule.period * 2)
  if value < 0 then
    ttl = math.ceil((rule.limit - value) / rule.rate) + 1
  end
  redis.call('HSET', key, 'level', string.format('%.17g', value), 'ts', ARGV[2])
  redis.call('EXPIRE', key, ttl)
end

for i, key in ipairs(KEYS) do
  local at = 3 + (i - 1) * 4
  local limit, period = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  rules[i] = {kind = ARGV[at], limit = limit, period = period, rate = limit / period,
              cost = tonumber(ARGV[at + 3])}
  values[i] = current(key, rules[i])
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
      write(KEYS[i], rule, values[i])
    end
  end
end
for i, value in ipairs(values) do
  reply[i + 1] = string.format('%.17g', value)
end
return reply
""".replace("BUDGET_GRACE_S", str(BUDGET_GRACE_S))


class RedisCounters:
    """Counters in the Redis at `url`, under `namespace`; one client (a connection pool) for
    every call. A call that cannot reach Redis within `timeout_s` raises
    CounterStoreUnavailable; it is not retried, since a script whose reply was lost may have
    charged already."""

    def __init__(self, url: str, *, namespace: str = "dora-gateway:quota:",
                 timeout_s: float = 0.25) -> None:
        self._where = _without_password(url)
        self._namespace = namespace
        self._client = Redis.from_url(url, socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self._script = self._client.register_script(SCRIPT)

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
        await self._client.aclose()

    async def _run(self, mode: str, rules: Sequence[Rule], now: float) -> list[Any]:
        keys = [self._namespace + rule.key for rule in rules]
        args: list[str | int | float] = [mode, now]
        for rule in rules:
            args += [str(rule.kind), rule.limit, rule.period_s, rule.cost]
        return await self._guard(self._script(keys=keys, args=args))

    async def _guard(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except (RedisError, OSError, TimeoutError) as error:
            raise CounterStoreUnavailable(
                f"quota counter store {self._where} unavailable: {error}") from error


def _without_password(url: str) -> str:
    """`url` without its credentials, for messages and logs."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
