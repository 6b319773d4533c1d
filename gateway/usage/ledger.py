"""The usage ledger: totals accumulate in memory as requests finish and are added to
`usage_hourly` in one transaction per flush.

Rows are added to, never overwritten, so gateway replicas flushing into one database sum up.
Pending totals are keyed by (tenant, adapter, hour); tenants come from the config and adapters
from the registry, so between flushes there are at most tenants x adapters x hours spanned
keys, however many requests arrive.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass

from sqlalchemy import Engine, RowMapping, func, select
from sqlalchemy.exc import DBAPIError

from gateway.errors import RegistryUnavailable
from gateway.registry.schema import upsert, usage_hourly

HOUR_S = 3600
GROUP_FIELDS = ("tenant", "adapter", "hour")
COUNTED = ("requests", "errors", "prompt_tokens", "completion_tokens")
# What every query row and CSV line has after its group fields.
TOTALS = (*COUNTED, "total_tokens")

Key = tuple[str, str, int]


@dataclass
class Counts:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


def group_fields(group_by: Sequence[str]) -> tuple[str, ...]:
    """`group_by` in the canonical order; `ValueError` naming any unknown field."""
    unknown = sorted(set(group_by) - set(GROUP_FIELDS))
    if unknown:
        raise ValueError(f"cannot group usage by {', '.join(unknown)}: group by any of "
                         f"{', '.join(GROUP_FIELDS)}")
    return tuple(field for field in GROUP_FIELDS if field in group_by)


class UsageLedger:
    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[Key, Counts] = {}

    def add(self, tenant: str, adapter: str, *, ok: bool, prompt_tokens: int | None,
            completion_tokens: int | None) -> None:
        """Count one finished request (on the event loop: memory only, no I/O)."""
        hour = int(self._clock()) // HOUR_S * HOUR_S
        counts = Counts(1, int(not ok), prompt_tokens or 0, completion_tokens or 0)
        with self._lock:
            self._pending.setdefault((tenant, adapter, hour), Counts()).add(counts)

    def pending_requests(self) -> int:
        """Requests counted but not yet written."""
        with self._lock:
            return sum(counts.requests for counts in self._pending.values())

    def flush(self) -> int:
        """Add the pending totals to the database (blocking); the number of rows written.

        A failed transaction wrote nothing, so its totals go back to pending for the next
        flush and `RegistryUnavailable` is raised. Rows are written in key order, so replicas
        flushing the same keys lock them in one order and never deadlock."""
        with self._lock:
            taken, self._pending = self._pending, {}
        if not taken:
            return 0
        statement = upsert(usage_hourly, self._engine.dialect.name)
        statement = statement.on_conflict_do_update(
            index_elements=list(GROUP_FIELDS),
            set_={name: usage_hourly.c[name] + statement.excluded[name] for name in COUNTED})
        rows = [dict(zip((*GROUP_FIELDS, *COUNTED), (*key, *astuple(taken[key])), strict=True))
                for key in sorted(taken)]
        try:
            with self._engine.begin() as connection:
                connection.execute(statement, rows)
        except DBAPIError as exc:
            self._restore(taken)
            raise RegistryUnavailable("The registry database is unavailable; usage is kept "
                                      "in memory until it is back") from exc
        return len(rows)

    def query(self, *, tenant: str | None, start: int, end: int,
              group_by: Sequence[str]) -> list[dict]:
        """Totals of the hours in [`start`, `end`), grouped by `group_by` and ordered by it;
        [] when no hour matches. Blocking."""
        fields = group_fields(group_by)
        groups = [usage_hourly.c[field] for field in fields]
        statement = (select(*groups, *(func.sum(usage_hourly.c[name]).label(name)
                                       for name in COUNTED))
                     .where(usage_hourly.c.hour >= start, usage_hourly.c.hour < end)
                     .group_by(*groups).order_by(*groups))
        if tenant is not None:
            statement = statement.where(usage_hourly.c.tenant == tenant)
        try:
            with self._engine.begin() as connection:
                rows = connection.execute(statement).mappings().all()
        except DBAPIError as exc:
            raise RegistryUnavailable("Usage is unavailable while the registry database is; "
                                      "retry shortly") from exc
        # Without GROUP BY, no matching hour is still one row, of NULL sums.
        return [_result(row, fields) for row in rows if row["requests"] is not None]

    def _restore(self, taken: dict[Key, Counts]) -> None:
        with self._lock:
            for key, counts in taken.items():
                self._pending.setdefault(key, Counts()).add(counts)


def _result(row: RowMapping, fields: tuple[str, ...]) -> dict:
    """Plain ints: PostgreSQL's SUM of BIGINT is a Decimal."""
    result = {field: row[field] for field in fields}
    result.update({name: int(row[name]) for name in COUNTED})
    result["total_tokens"] = result["prompt_tokens"] + result["completion_tokens"]
    return result
