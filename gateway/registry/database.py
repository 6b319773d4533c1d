"""The durable registry: the adapters served, in SQLite (one host) or PostgreSQL (replicas).

Every change is one transaction that also increments `registry_generation`, and is committed
before the admin API answers. The generation row is updated first, so concurrent changes are
serialised by its row lock; the adapter name's primary key makes concurrent adds of one name
one success and one `Conflict`. Calls block (run them in a thread); an unreachable database
is `RegistryUnavailable` (503) while serving and `RegistryUnreachable` at start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, delete, event, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError

from adapters.errors import DoraGatewayError
from gateway.errors import Conflict, NotFound, RegistryUnavailable
from gateway.registry.schema import adapters, migrate, registry_generation, removed_adapters

CONNECT_TIMEOUT_S = 5
# A statement that waits longer (a lock held by a stuck session, a silent network) fails as
# unavailable instead of holding an admin request forever.
STATEMENT_TIMEOUT_MS = 15_000
SQLITE_BUSY_TIMEOUT_S = 30

log = logging.getLogger(__name__)


class RegistryUnreachable(DoraGatewayError):
    """The database could not be opened at start."""


@dataclass(frozen=True)
class StoredAdapter:
    """An `adapters` row. `artifact` is the compiled artifact's directory name in the store,
    so gateways that mount the shared store elsewhere still find it."""

    name: str
    origin: str
    source: str
    content_hash: str
    artifact: str
    is_dora: bool
    compile_seconds: float
    added_by: str
    added_at: int
    fetched_from: str | None = None


@dataclass(frozen=True)
class Snapshot:
    generation: int
    adapters: dict[str, StoredAdapter]
    removed: frozenset[str]


def shown_url(url: str) -> str:
    """`url` without its password, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


class RegistryDatabase:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        """For the other tables' owners (usage, tenant limits), which share the connection
        pool."""
        return self._engine

    @classmethod
    def open(cls, url: str) -> RegistryDatabase:
        """Connect and bring the schema up to date; `RegistryUnreachable` if that fails."""
        try:
            engine = _engine(url)
        except ArgumentError as exc:
            raise RegistryUnreachable(f"registry url {shown_url(url)}: {exc}") from exc
        try:
            with engine.begin() as connection:
                found = migrate(connection)
        except DBAPIError as exc:
            engine.dispose()
            raise RegistryUnreachable(
                f"cannot open the registry {shown_url(url)}: {reason(exc)} (is the database "
                f"running, and is [registry] url right?)") from exc
        if found == 0:
            log.info("created the registry schema in %s", shown_url(url))
        return cls(engine)

    def close(self) -> None:
        self._engine.dispose()

    def generation(self) -> int:
        with self._transaction() as connection:
            return connection.scalar(select(registry_generation.c.generation))

    def snapshot(self) -> Snapshot:
        """Everything, read after the generation: a change committed in between shows as a
        newer generation at the next read, never as a missed one."""
        with self._transaction() as connection:
            generation = connection.scalar(select(registry_generation.c.generation))
            rows = connection.execute(select(adapters)).mappings()
            stored = {row["name"]: StoredAdapter(**row) for row in rows}
            removed = connection.scalars(select(removed_adapters.c.name))
            return Snapshot(generation, stored, frozenset(removed))

    def exists(self, name: str) -> bool:
        with self._transaction() as connection:
            return connection.scalar(select(adapters.c.name).where(adapters.c.name == name)) \
                is not None

    def add(self, adapter: StoredAdapter) -> None:
        """Register `adapter`; `Conflict` if its name is taken. A removed name is free again."""
        try:
            with self._transaction() as connection:
                _bump(connection)
                connection.execute(insert(adapters).values(**vars(adapter)))
                connection.execute(delete(removed_adapters)
                                   .where(removed_adapters.c.name == adapter.name))
        except IntegrityError as exc:
            raise Conflict(f"An adapter named '{adapter.name}' already exists", param="name",
                           code="adapter_exists") from exc

    def replace(self, adapter: StoredAdapter) -> None:
        """The row of `adapter.name` becomes `adapter` (a directory adapter whose files
        changed)."""
        with self._transaction() as connection:
            _bump(connection)
            connection.execute(update(adapters).where(adapters.c.name == adapter.name)
                               .values(**vars(adapter)))

    def remove(self, name: str, removed_by: str) -> None:
        """Unregister `name` and remember it was removed; `NotFound` if it is not there."""
        with self._transaction() as connection:
            _bump(connection)
            if connection.execute(delete(adapters).where(adapters.c.name == name)).rowcount == 0:
                raise NotFound(f"No adapter named '{name}'", param="name",
                               code="adapter_not_found")
            connection.execute(delete(removed_adapters).where(removed_adapters.c.name == name))
            connection.execute(insert(removed_adapters).values(
                name=name, removed_by=removed_by, removed_at=int(time.time())))

    def discard(self, name: str) -> None:
        """Undo an add that failed after it was written (no removal is remembered)."""
        with self._transaction() as connection:
            _bump(connection)
            connection.execute(delete(adapters).where(adapters.c.name == name))

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as connection:
                yield connection
        except IntegrityError:
            raise
        except DBAPIError as exc:
            raise RegistryUnavailable() from exc


def _bump(connection: Connection) -> None:
    connection.execute(update(registry_generation)
                       .values(generation=registry_generation.c.generation + 1))


def reason(exc: DBAPIError) -> str:
    """The driver's first line about what failed."""
    lines = str(exc.orig).strip().splitlines()
    return lines[0] if lines else type(exc.orig).__name__


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True, pool_size=2, max_overflow=4,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT_S,
                                       "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"})


def _sqlite_engine(url: str) -> Engine:
    """SQLite with real transactions: pysqlite's own BEGIN is off and every transaction
    starts `BEGIN IMMEDIATE`, so two processes on one file serialise their changes."""
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
