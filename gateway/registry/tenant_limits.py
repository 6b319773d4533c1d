"""Limits an admin set for a tenant through the API, kept in the registry's database so every
replica, and every restart, enforces the same ones. They override the config's limits for
that tenant; `None` is no such limit. Values are validated by the caller."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, delete, select
from sqlalchemy.exc import DBAPIError

from gateway.errors import RegistryUnavailable
from gateway.registry.schema import tenant_limits, upsert


@dataclass(frozen=True)
class StoredLimits:
    """A `tenant_limits` row."""

    tenant: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    token_budget: int | None
    budget_period: str | None
    updated_by: str
    updated_at: int


class TenantLimitsTable:
    """Blocking calls (run them in a thread); an unreachable database is
    `RegistryUnavailable`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def all(self) -> dict[str, StoredLimits]:
        with self._transaction() as connection:
            rows = connection.execute(select(tenant_limits)).mappings()
            return {row["tenant"]: StoredLimits(**row) for row in rows}

    def put(self, limits: StoredLimits) -> None:
        """Set the tenant's row whether or not it has one (concurrent puts: the last wins)."""
        values = vars(limits)
        statement = upsert(tenant_limits, self._engine.dialect.name)
        statement = statement.values(**values).on_conflict_do_update(
            index_elements=["tenant"],
            set_={name: value for name, value in values.items() if name != "tenant"})
        with self._transaction() as connection:
            connection.execute(statement)

    def delete(self, tenant: str) -> bool:
        """Remove the tenant's row (its config limits apply again); whether it had one."""
        with self._transaction() as connection:
            return connection.execute(delete(tenant_limits)
                                      .where(tenant_limits.c.tenant == tenant)).rowcount > 0

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as connection:
                yield connection
        except DBAPIError as exc:
            raise RegistryUnavailable() from exc
