"""Rate-limit counters: requests and tokens per minute (token buckets) and a token budget per
calendar period (a counter per period key), kept in this process (`MemoryCounters`) or in Redis
for every gateway replica at once (`redis_counters.RedisCounters`), with one semantics.

Semantics:
    charge(rules, now): values = [current(rule, now) for rule in rules]
        if all(admits(rule, value)): value = settle(rule, value) for each; allowed, readings after
        else: nothing written; refused = first refusing rule, readings of values, its retry_after
    adjust(rules, now): value = settle(rule, current(rule, now)) for each rule, unconditionally
    settle: bucket level = min(limit, level - cost) (may go negative: debt);
        budget used = max(0, used + cost)

A bucket refills at limit / period_s per second since its last write, and a missing one is full;
a budget's key names its period, so a new period starts at 0.

Why not the `limits` library: the gateway needs (1) an all-or-nothing check of several limits in
one round trip (a request refused by its tokens limit must not consume its requests limit),
(2) settlement: an estimate charged on entry, then adjusted by actual - estimate, refunds
included, (3) calendar-aligned budget periods and an injectable clock. `limits` offers none of
these; a small Lua script does all three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from adapters.errors import DoraGatewayError

BUDGET_GRACE_S = 3600  # a budget key outlives its period by this much (garbage collection only)
SWEEP_INTERVAL_S = 60.0  # how often (in `now` seconds) MemoryCounters drops expired state


class CounterStoreUnavailable(DoraGatewayError):
    """The counter store could not be reached or answered in time."""


class RuleKind(StrEnum):
    BUCKET = "bucket"  # requests/tokens per minute: a token bucket
    BUDGET = "budget"  # tokens per calendar period: a counter that resets when the key changes


@dataclass(frozen=True)
class Rule:
    """One limit to check and charge (or adjust: a negative cost is a refund).

    BUCKET: `limit` is the capacity, refilled from empty to full in `period_s`. BUDGET: `limit`
    is the period's total, `period_s` the seconds from `now` until the period ends. `key` is the
    caller's (e.g. "tpm:acme", "budget:acme:2026-12-03"); the store prefixes its namespace.
    """

    key: str
    kind: RuleKind
    limit: int
    period_s: float
    cost: int

    def __post_init__(self) -> None:
        if self.limit < 0 or self.period_s < 0:
            raise ValueError(f"rule {self.key!r}: limit and period_s must not be negative")
        if self.kind == RuleKind.BUCKET and not (self.limit > 0 and self.period_s > 0):
            raise ValueError(f"bucket {self.key!r} needs a positive limit and period_s")

    @property
    def rate(self) -> float:
        """A bucket's refill, per second."""
        return self.limit / self.period_s


@dataclass(frozen=True)
class Reading:
    remaining: int  # after this charge if allowed, else the current amount (never below 0)
    reset_s: float  # BUCKET: seconds until full again; BUDGET: period_s


@dataclass(frozen=True)
class Outcome:
    allowed: bool
    readings: tuple[Reading, ...]  # one per rule, in the rules' order
    refused: int | None  # index of the first rule that refused, None when allowed
    retry_after_s: float | None  # when the refusing rule would admit its cost; None if never


class Counters(Protocol):
    async def charge(self, rules: Sequence[Rule], now: float) -> Outcome: ...

    async def adjust(self, rules: Sequence[Rule], now: float) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def check_rules(rules: Sequence[Rule], *, charging: bool) -> None:
    """Reject what the stores would treat differently: one key twice in a call (read once,
    written twice) and a negative charge (a refund is an adjust)."""
    if len({rule.key for rule in rules}) != len(rules):
        raise ValueError("the rules of one call must name distinct keys")
    if charging and any(rule.cost < 0 for rule in rules):
        raise ValueError("a charge's costs must not be negative: refunds are adjusts")


def outcome(rules: Sequence[Rule], values: Sequence[float], refused: int | None) -> Outcome:
    """The outcome of a charge from each rule's value (a bucket's level, a budget's used),
    after the charge if allowed, else before it."""
    readings = tuple(_reading(rule, value) for rule, value in zip(rules, values, strict=True))
    if refused is None:
        return Outcome(True, readings, None, None)
    return Outcome(False, readings, refused, _retry_after(rules[refused], values[refused]))


def _reading(rule: Rule, value: float) -> Reading:
    if rule.kind == RuleKind.BUDGET:
        return Reading(max(0, rule.limit - int(value)), rule.period_s)
    return Reading(math.floor(max(value, 0)), (rule.limit - value) / rule.rate)


def _retry_after(rule: Rule, value: float) -> float | None:
    if rule.cost > rule.limit:
        return None
    if rule.kind == RuleKind.BUDGET:
        return rule.period_s
    return (rule.cost - value) / rule.rate


def _admits(rule: Rule, value: float) -> bool:
    if rule.cost == 0:
        return True
    if rule.kind == RuleKind.BUDGET:
        return value + rule.cost <= rule.limit
    return value >= rule.cost


def _first_refusal(rules: Sequence[Rule], values: Sequence[float]) -> int | None:
    refusing = (index for index, (rule, value) in enumerate(zip(rules, values, strict=True))
                if not _admits(rule, value))
    return next(refusing, None)


def _settled(rule: Rule, value: float) -> float:
    """The value once `rule.cost` is taken (a charge) or added back (a negative adjust)."""
    if rule.kind == RuleKind.BUDGET:
        return max(0, value + rule.cost)
    return min(rule.limit, value - rule.cost)


def _ttl_s(rule: Rule, value: float) -> int:
    """How long a written value must be kept: until a bucket is full again, debt included."""
    if rule.kind == RuleKind.BUDGET:
        return math.ceil(rule.period_s) + BUDGET_GRACE_S
    if value < 0:
        return math.ceil((rule.limit - value) / rule.rate) + 1
    return math.ceil(rule.period_s * 2)


@dataclass
class _State:
    value: float  # a bucket's level or a budget's used tokens
    ts: float  # `now` of the write
    expires: float  # `now` from which the state is forgotten


class MemoryCounters:
    """Counters for one gateway process. asyncio runs one call at a time, and no call awaits
    anything, so each is atomic without a lock. Expired state (a bucket full again, a budget
    past its period) is dropped, so memory follows the active keys only."""

    def __init__(self) -> None:
        self._states: dict[str, _State] = {}
        self._next_sweep = -math.inf

    async def charge(self, rules: Sequence[Rule], now: float) -> Outcome:
        check_rules(rules, charging=True)
        values = self._read(rules, now)
        refused = _first_refusal(rules, values)
        if refused is None:
            values = self._write(rules, values, now)
        return outcome(rules, values, refused)

    async def adjust(self, rules: Sequence[Rule], now: float) -> None:
        check_rules(rules, charging=False)
        self._write(rules, self._read(rules, now), now)

    async def ping(self) -> None:
        """Always reachable: the state is in this process."""

    async def close(self) -> None:
        self._states.clear()

    def _read(self, rules: Sequence[Rule], now: float) -> list[float]:
        self._sweep(now)
        return [self._current(rule, now) for rule in rules]

    def _current(self, rule: Rule, now: float) -> float:
        state = self._states.get(rule.key)
        if state is None or now >= state.expires:
            return rule.limit if rule.kind == RuleKind.BUCKET else 0
        if rule.kind == RuleKind.BUDGET:
            return state.value
        return min(rule.limit, state.value + max(0.0, now - state.ts) * rule.rate)

    def _write(self, rules: Sequence[Rule], values: Sequence[float], now: float) -> list[float]:
        """Settles every rule with a cost; returns the values after."""
        after = []
        for rule, value in zip(rules, values, strict=True):
            if rule.cost != 0:
                value = _settled(rule, value)
                self._states[rule.key] = _State(value, now, now + _ttl_s(rule, value))
            after.append(value)
        return after

    def _sweep(self, now: float) -> None:
        """Drops expired state, at most once per SWEEP_INTERVAL_S so a call stays O(rules)."""
        if now < self._next_sweep:
            return
        self._states = {key: state for key, state in self._states.items() if now < state.expires}
        self._next_sweep = now + SWEEP_INTERVAL_S
