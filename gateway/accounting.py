"""The tenants' limits and usage, put together for the app.

The counters `[limits] store` names (this process's memory, or a Redis every replica shares),
the limits book (config, or admin-set in the registry's database), the guard in front of vLLM
and the usage ledger (in the registry's database); and the background work that keeps them
current: the admin-set limits re-read, the ledger flushed every second, the counter store
pinged so `/health` says whether it is reachable even without traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, Metric
from sqlalchemy.engine import make_url

from gateway.config import LimitsConfig
from gateway.errors import RegistryUnavailable
from gateway.quota import book as limits_book
from gateway.quota.counters import Counters, MemoryCounters
from gateway.quota.guard import Quota
from gateway.quota.policy import LimitName
from gateway.quota.redis_counters import RedisCounters
from gateway.registry.database import RegistryDatabase
from gateway.registry.tenant_limits import TenantLimitsTable
from gateway.telemetry.hub import Telemetry
from gateway.telemetry.prometheus import PREFIX, gauge
from gateway.telemetry.records import RequestRecord
from gateway.tenancy.tenants import Tenant
from gateway.usage.ledger import UsageLedger

FLUSH_INTERVAL_S = 1.0
STORE_CHECK_INTERVAL_S = 5.0

log = logging.getLogger(__name__)


@dataclass
class Accounting:
    book: limits_book.LimitsBook
    quota: Quota
    ledger: UsageLedger
    store: str  # shown in /health: "memory", or the Redis URL without its password

    @classmethod
    def build(cls, limits: LimitsConfig, tenants: Iterable[Tenant],
              database: RegistryDatabase, telemetry: Telemetry) -> Accounting:
        book = limits_book.LimitsBook({tenant.name: tenant.limits for tenant in tenants},
                                      TenantLimitsTable(database.engine))
        refusals = telemetry.metrics.limit_refusals
        quota = Quota(counters_for(limits), book.limits, fail_open=limits.fail == "open",
                      on_refusal=lambda tenant, limit: refusals.labels(tenant, limit).inc())
        ledger = UsageLedger(database.engine)
        telemetry.add_sink(lambda record: _count(ledger, record))
        store = make_url(limits.store).render_as_string(hide_password=True) \
            if limits.store else "memory"
        accounting = cls(book, quota, ledger, store)
        telemetry.metrics.add_gauges(accounting.metrics)
        return accounting

    async def run(self) -> None:
        """The background work, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(limits_book.follow(self.book))
            group.create_task(self._keep_flushed())
            group.create_task(self._keep_checking_store())

    async def aclose(self) -> None:
        """Write the last usage (once more if the database is briefly away) and settle."""
        await self.quota.aclose()
        with contextlib.suppress(RegistryUnavailable):
            await asyncio.to_thread(self.ledger.flush)
        if self.ledger.pending_requests():
            log.warning("%d requests' usage could not be written: the registry database is "
                        "unreachable", self.ledger.pending_requests())

    async def tenants_view(self, tenants: Iterable[Tenant],
                           in_flight: Mapping[str, int]) -> list[dict]:
        """Each tenant's use against its limits, for the dashboard: requests in flight, and
        per limit its size, what is left and when it is whole again (`limits` None: the
        counters are unreachable)."""
        view = []
        for tenant in tenants:
            standing = await self.quota.standing(tenant.name)
            if standing and LimitName.BUDGET in standing:
                standing[LimitName.BUDGET]["period"] = str(
                    self.book.limits(tenant.name).budget_period)
            view.append({"tenant": tenant.name, "in_flight": in_flight.get(tenant.name, 0),
                         "max_concurrency": tenant.max_concurrency, "limits": standing})
        return view

    def health(self) -> Mapping[str, object]:
        return {"store": self.store, "reachable": self.quota.health.reachable,
                "fail": "open" if self.quota.fail_open else "closed"}

    def metrics(self) -> Iterable[Metric]:
        health = self.quota.health
        yield gauge("limit_store_up", "1 while the rate-limit counters are reachable", (),
                    [((), float(health.reachable))])
        unchecked = CounterMetricFamily(
            f"{PREFIX}_limit_store_unreachable_requests",
            "Requests of limited tenants while the counters were unreachable, by what "
            "`[limits] fail` did with them", labels=("outcome",))
        unchecked.add_metric(("allowed",), health.unlimited_requests)
        unchecked.add_metric(("refused",), health.refused_requests)
        yield unchecked

    async def _keep_flushed(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await asyncio.to_thread(self.ledger.flush)
            except RegistryUnavailable:
                pass  # kept in memory; the registry's sync logs the database's outage
            except Exception:
                log.exception("writing usage failed")

    async def _keep_checking_store(self) -> None:
        while True:
            await self.quota.check_store()
            await asyncio.sleep(STORE_CHECK_INTERVAL_S)


def counters_for(limits: LimitsConfig) -> Counters:
    return RedisCounters(limits.store) if limits.store else MemoryCounters()


def _count(ledger: UsageLedger, record: RequestRecord) -> None:
    ledger.add(record.tenant, record.adapter, ok=record.ok, prompt_tokens=record.prompt_tokens,
               completion_tokens=record.completion_tokens)
