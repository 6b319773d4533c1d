"""The limit check in front of vLLM: a request is charged before it is sent and settled when
its answer ends.

A request's size is not known up front, so it is charged one request and an estimate of its
tokens (the prompt guessed from its text, plus `n` times its output cap) on entry, all
limits at once or none. When it finishes, the charge is settled with vLLM's usage: refunded
down to the real count, or charged more. An answer without usage (an aborted stream, a client
that left) is settled at the prompt estimate plus the text chunks relayed; an error before
anything was generated is refunded.

If the counters cannot be reached, `fail_open` decides: let the request through unlimited
(the default: the concurrency and `max_tokens` limits still hold) or refuse it with 503.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from gateway.errors import LimitExceeded, LimitsUnavailable, QuotaSpent
from gateway.quota.counters import Counters, CounterStoreUnavailable, Outcome, Reading, Rule
from gateway.quota.policy import LimitName, TenantLimits
from gateway.telemetry.records import CLIENT_CLOSED_REQUEST, RequestRecord

Clock = Callable[[], float]
HEADER_LIMITS = {LimitName.REQUESTS: "requests", LimitName.TOKENS: "tokens"}
NO_RETRY = {"x-should-retry": "false"}  # the openai SDK does not retry such a 429

log = logging.getLogger(__name__)


@dataclass
class StoreHealth:
    """What the last call to the counter store showed."""

    reachable: bool = True
    unlimited_requests: int = 0  # let through unchecked while the store was unreachable
    refused_requests: int = 0    # refused (fail closed) while it was unreachable


@dataclass
class Charge:
    """One admitted request's charge: its response headers, and its settlement."""

    tenant: str
    prompt_estimate: int
    rules: list[tuple[LimitName, Rule]]
    headers: dict[str, str] = field(default_factory=dict)


class Quota:
    """`limits(tenant)`: the tenant's limits now (config, or what an admin set);
    `on_refusal(tenant, limit)` counts each refusal."""

    def __init__(self, counters: Counters, limits: Callable[[str], TenantLimits], *,
                 fail_open: bool = True, clock: Clock = time.time,
                 on_refusal: Callable[[str, LimitName], None] = lambda tenant, limit: None,
                 ) -> None:
        self._counters = counters
        self._limits = limits
        self._clock = clock
        self._on_refusal = on_refusal
        self._unsent: dict[str, Rule] = {}  # adjustments not yet sent, by counter key
        self._sender: asyncio.Task | None = None
        self.fail_open = fail_open
        self.health = StoreHealth()

    async def admit(self, tenant: str, *, prompt_estimate: int, output_cap: int) -> Charge:
        """Charge one request and `prompt_estimate + output_cap` tokens, or raise the 429 of
        the first limit that refuses (nothing is charged then)."""
        now = self._clock()
        rules = self._limits(tenant).rules(tenant, requests=1,
                                           tokens=prompt_estimate + output_cap, now=now)
        charge = Charge(tenant, prompt_estimate, rules)
        if not rules:
            return charge
        outcome = await self._charge(rules, now)
        if outcome is None:
            return Charge(tenant, prompt_estimate, [])  # nothing charged: nothing to settle
        charge.headers = rate_headers(rules, outcome.readings)
        if not outcome.allowed:
            assert outcome.refused is not None
            name, rule = rules[outcome.refused]
            self._on_refusal(tenant, name)
            raise refusal(name, rule, outcome, charge.headers)
        return charge

    def settle(self, charge: Charge, record: RequestRecord) -> None:
        """Adjust `charge` to what the request used (in the background: the answer is out)."""
        tokens = tokens_used(record, charge.prompt_estimate)
        self._adjust(charge, requests=0, tokens=tokens)

    def refund(self, charge: Charge) -> None:
        """Take back the whole charge of a request that was not sent after all."""
        self._adjust(charge, requests=-1, tokens=0)

    async def standing(self, tenant: str) -> dict[str, dict] | None:
        """Each limit's limit, remaining and reset, without charging (None: store down)."""
        now = self._clock()
        limits = self._limits(tenant).rules(tenant, requests=0, tokens=0, now=now)
        if not limits:
            return {}
        try:  # not a request: neither let through nor refused, whatever `fail_open` says
            outcome = await self._counters.charge([rule for _, rule in limits], now)
        except CounterStoreUnavailable as exc:
            self._store_down(exc)
            return None
        self._store_up()
        return {name: {"limit": rule.limit, "remaining": reading.remaining,
                       "reset_seconds": round(reading.reset_s, 3)}
                for (name, rule), reading in zip(limits, outcome.readings, strict=True)}

    async def check_store(self) -> None:
        try:
            await self._counters.ping()
        except CounterStoreUnavailable:
            self._store_down()
        else:
            self._store_up()

    async def settled(self) -> None:
        """Returns once every settlement so far has been sent (or failed)."""
        while self._sender is not None:
            await asyncio.wait({self._sender})

    async def aclose(self) -> None:
        await self.settled()
        await self._counters.close()

    async def _charge(self, rules: list[tuple[LimitName, Rule]], now: float) -> Outcome | None:
        """The counters' outcome, or None when they are unreachable and the rule is to fail
        open."""
        try:
            outcome = await self._counters.charge([rule for _, rule in rules], now)
        except CounterStoreUnavailable as exc:
            self._store_down(exc)
            if self.fail_open:
                self.health.unlimited_requests += 1
                return None
            self.health.refused_requests += 1
            raise LimitsUnavailable("The rate-limit counters cannot be reached; retry "
                                    "shortly", headers={"Retry-After": "1"}) from exc
        self._store_up()
        return outcome

    def _adjust(self, charge: Charge, *, requests: int, tokens: int) -> None:
        """Add `requests` to the requests limit and move the token limits from what was
        charged (each rule's cost) to `tokens`: summed per counter with the adjustments not
        yet sent, so under load one call to the store carries many requests' settlements."""
        for name, rule in charge.rules:
            cost = requests if name is LimitName.REQUESTS else tokens - rule.cost
            waiting = self._unsent.get(rule.key)
            self._unsent[rule.key] = replace(rule, cost=cost + (waiting.cost if waiting else 0))
        if self._unsent and self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_adjustments())

    async def _send_adjustments(self) -> None:
        """Send what waits, and again what came meanwhile, until nothing waits."""
        try:
            while self._unsent:
                batch = [rule for rule in self._unsent.values() if rule.cost != 0]
                self._unsent = {}
                if not batch:
                    continue
                try:
                    await self._counters.adjust(batch, self._clock())
                except CounterStoreUnavailable as exc:
                    self._store_down(exc)
        finally:
            self._sender = None

    def _store_down(self, exc: Exception | None = None) -> None:
        if self.health.reachable:
            log.warning("the rate-limit counters are unreachable (%s): %s", exc or "ping failed",
                        "requests go through unlimited" if self.fail_open
                        else "requests of limited tenants are refused")
        self.health.reachable = False

    def _store_up(self) -> None:
        if not self.health.reachable:
            log.info("the rate-limit counters are reachable again")
        self.health.reachable = True


def tokens_used(record: RequestRecord, prompt_estimate: int) -> int:
    """vLLM's count when it gave one; else the estimate of what was computed."""
    if record.prompt_tokens is not None:
        return record.prompt_tokens + (record.completion_tokens or 0)
    if record.text_chunks or record.status == CLIENT_CLOSED_REQUEST:
        return prompt_estimate + record.text_chunks
    return 0


def rate_headers(rules: list[tuple[LimitName, Rule]], readings: tuple[Reading, ...],
                 ) -> dict[str, str]:
    """OpenAI's `x-ratelimit-*` headers for the per-minute limits."""
    headers = {}
    for (name, rule), reading in zip(rules, readings, strict=True):
        kind = HEADER_LIMITS.get(name)
        if kind is None:
            continue
        headers[f"x-ratelimit-limit-{kind}"] = str(rule.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(reading.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = duration_text(reading.reset_s)
    return headers


def refusal(name: LimitName, rule: Rule, outcome: Outcome, headers: dict[str, str],
            ) -> LimitExceeded | QuotaSpent:
    retry = outcome.retry_after_s
    never = retry is None
    wait = {} if never else {"Retry-After": str(max(1, math.ceil(retry))),
                             "retry-after-ms": str(max(1, math.ceil(retry * 1000)))}
    if name is LimitName.BUDGET:
        return QuotaSpent(f"This API key's token budget ({rule.limit} tokens this period) is "
                          f"spent, or too small for this request's {rule.cost} tokens; it "
                          f"starts again in {duration_text(rule.period_s)}",
                          headers={**headers, **wait, **NO_RETRY})
    unit = "requests" if name is LimitName.REQUESTS else "tokens"
    if never:
        return LimitExceeded(f"This request's {rule.cost} {unit} (prompt estimate and output "
                             f"cap) exceed this API key's limit of {rule.limit} {unit} per "
                             f"minute; lower max_tokens", headers={**headers, **NO_RETRY})
    return LimitExceeded(f"Rate limit reached for {unit} per minute: limit {rule.limit}, "
                         f"requested {rule.cost}; retry in {duration_text(retry)}",
                         headers={**headers, **wait})


def duration_text(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3s"."""
    milliseconds = max(0, math.ceil(seconds * 1000))
    if milliseconds < 1000:  # not seconds < 1: 0.9995 s is "1s", not "1000ms"
        return f"{milliseconds}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
