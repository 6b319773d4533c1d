"""Each tenant's limits now: the config's, or what an admin set through the API.

Admin-set limits live in the registry's database (`tenant_limits`), so they survive restarts
and every gateway replica enforces the same ones. Each replica re-reads the table every
second (one small query): a change made through one gateway holds everywhere within about a
second. While the database is unreachable, the limits read last stay in force.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import RegistryUnavailable
from gateway.quota.policy import BudgetPeriod, TenantLimits
from gateway.registry.tenant_limits import StoredLimits, TenantLimitsTable

REFRESH_INTERVAL_S = 1.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetLimits:
    """Limits an admin set, with who set them and when."""

    limits: TenantLimits
    updated_by: str
    updated_at: int


class LimitsBook:
    def __init__(self, configured: Mapping[str, TenantLimits], table: TenantLimitsTable) -> None:
        self._configured = dict(configured)
        self._table = table
        self._set: dict[str, SetLimits] = {}

    def tenants(self) -> list[str]:
        return sorted(self._configured)

    def limits(self, tenant: str) -> TenantLimits:
        found = self._set.get(tenant)
        return found.limits if found else self._configured.get(tenant, TenantLimits())

    def set_by_admin(self, tenant: str) -> SetLimits | None:
        return self._set.get(tenant)

    async def put(self, tenant: str, limits: TenantLimits, updated_by: str) -> None:
        stored = StoredLimits(tenant, limits.requests_per_minute, limits.tokens_per_minute,
                              limits.token_budget, str(limits.budget_period), updated_by,
                              int(time.time()))
        await asyncio.to_thread(self._table.put, stored)
        self._set[tenant] = _from_stored(stored)

    async def delete(self, tenant: str) -> bool:
        removed = await asyncio.to_thread(self._table.delete, tenant)
        self._set.pop(tenant, None)
        return removed

    async def refresh(self) -> None:
        stored = await asyncio.to_thread(self._table.all)
        self._set = {tenant: _from_stored(row) for tenant, row in stored.items()
                     if tenant in self._configured}


async def follow(book: LimitsBook, interval_s: float = REFRESH_INTERVAL_S) -> None:
    """Re-read the admin-set limits every `interval_s` until cancelled."""
    while True:
        try:
            await book.refresh()
        except RegistryUnavailable:
            pass  # the registry's own sync logs the database going and coming back
        except Exception:
            log.exception("reading the tenants' limits failed")
        await asyncio.sleep(interval_s)


def _from_stored(row: StoredLimits) -> SetLimits:
    limits = TenantLimits(row.requests_per_minute, row.tokens_per_minute, row.token_budget,
                          BudgetPeriod(row.budget_period or BudgetPeriod.DAY))
    return SetLimits(limits, row.updated_by, row.updated_at)
