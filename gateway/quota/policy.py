"""A tenant's request and token limits, and the counter rules one request is checked against.

Per minute, a limit is a token bucket that refills continuously (as OpenAI describes its own
limits): `requests_per_minute` counts requests, `tokens_per_minute` prompt plus completion
tokens. A budget is a plain count of tokens per calendar period (a UTC day or month) that
starts again at zero when the next period begins.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from enum import StrEnum

from gateway.quota.counters import Rule, RuleKind

MINUTE_S = 60.0
DAY_S = 86400
# The largest limit: Redis's Lua counts in doubles, exact up to 2**53.
MAX_LIMIT = 2**53


class BudgetPeriod(StrEnum):
    DAY = "day"
    MONTH = "month"


class LimitName(StrEnum):
    """Which limit a rule stands for: the `limit` label of the refusal metric."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    BUDGET = "budget"


@dataclass(frozen=True)
class TenantLimits:
    """None: no such limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    token_budget: int | None = None
    budget_period: BudgetPeriod = BudgetPeriod.DAY

    @property
    def any(self) -> bool:
        return any(value is not None for value in (self.requests_per_minute,
                                                   self.tokens_per_minute, self.token_budget))

    def rules(self, tenant: str, *, requests: int, tokens: int, now: float,
              ) -> list[tuple[LimitName, Rule]]:
        """The rules of this tenant's limits, each with `requests` or `tokens` as its cost."""
        rules = []
        if self.requests_per_minute is not None:
            rules.append((LimitName.REQUESTS, Rule(f"rpm:{tenant}", RuleKind.BUCKET,
                                                   self.requests_per_minute, MINUTE_S, requests)))
        if self.tokens_per_minute is not None:
            rules.append((LimitName.TOKENS, Rule(f"tpm:{tenant}", RuleKind.BUCKET,
                                                 self.tokens_per_minute, MINUTE_S, tokens)))
        if self.token_budget is not None:
            start, end = period_bounds(self.budget_period, now)
            rules.append((LimitName.BUDGET, Rule(
                f"budget:{tenant}:{self.budget_period}:{start}", RuleKind.BUDGET,
                self.token_budget, end - now, tokens)))
        return rules


def period_bounds(period: BudgetPeriod, now: float) -> tuple[int, int]:
    """[start, end) of the UTC day or month that `now` (Unix seconds) falls in."""
    day_start = int(now // DAY_S * DAY_S)
    if period is BudgetPeriod.DAY:
        return day_start, day_start + DAY_S
    moment = time.gmtime(now)
    start = calendar.timegm((moment.tm_year, moment.tm_mon, 1, 0, 0, 0))
    days = calendar.monthrange(moment.tm_year, moment.tm_mon)[1]
    return start, start + days * DAY_S
