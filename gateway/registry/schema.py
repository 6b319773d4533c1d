"""The registry's tables and their versions.

`schema_version` holds one row per migration applied; a gateway brings an older database up
to `SCHEMA_VERSION` at start (under a lock, so replicas starting together migrate once) and
refuses a newer one rather than misread it. A later schema change adds a migration to
`MIGRATIONS`; it never edits an applied one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite

from adapters.errors import DoraGatewayError

metadata = MetaData()

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", BigInteger, nullable=False),
)

# One row per adapter served; the primary key is what makes a name taken exactly once.
adapters = Table(
    "adapters", metadata,
    Column("name", Text, primary_key=True),
    Column("origin", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("content_hash", Text, nullable=False),
    Column("artifact", Text, nullable=False),
    Column("is_dora", Boolean, nullable=False),
    Column("compile_seconds", Float, nullable=False),
    Column("added_by", Text, nullable=False),
    Column("added_at", BigInteger, nullable=False),
    # Since version 2: the URL an adapter was fetched from and what it resolved to.
    Column("fetched_from", Text, nullable=True),
)

# Names an admin removed: the `[adapters] dir` scan at start does not bring them back.
removed_adapters = Table(
    "removed_adapters", metadata,
    Column("name", Text, primary_key=True),
    Column("removed_by", Text, nullable=False),
    Column("removed_at", BigInteger, nullable=False),
)

# One row; every change increments it in the change's own transaction, so a replica learns
# that something changed from a one-row read.
registry_generation = Table(
    "registry_generation", metadata,
    Column("id", Integer, primary_key=True),
    Column("generation", BigInteger, nullable=False),
)

# Since version 3: requests and tokens per tenant, adapter and UTC hour (`hour` is the hour's
# start in Unix seconds). Replicas add to a row, never overwrite it.
usage_hourly = Table(
    "usage_hourly", metadata,
    Column("tenant", Text, primary_key=True),
    Column("adapter", Text, primary_key=True),
    Column("hour", BigInteger, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
)

# Since version 3: limits an admin set through the API; they override the config's for that
# tenant, and NULL is no such limit.
tenant_limits = Table(
    "tenant_limits", metadata,
    Column("tenant", Text, primary_key=True),
    Column("requests_per_minute", BigInteger, nullable=True),
    Column("tokens_per_minute", BigInteger, nullable=True),
    Column("token_budget", BigInteger, nullable=True),
    Column("budget_period", Text, nullable=True),
    Column("updated_by", Text, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)


def upsert(table: Table, dialect: str) -> postgresql.Insert | sqlite.Insert:
    """An INSERT of `dialect` (`engine.dialect.name`), which has `on_conflict_do_update`: a
    row written in one statement whether or not another replica wrote it first."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


class SchemaTooNew(DoraGatewayError):
    def __init__(self, found: int) -> None:
        super().__init__(f"the registry's schema is version {found}, newer than this gateway's "
                         f"{SCHEMA_VERSION}: run the gateway version that wrote it (or newer)")


def _create_v1(connection: Connection) -> None:
    metadata.create_all(connection, tables=[adapters, removed_adapters, registry_generation])
    connection.execute(insert(registry_generation).values(id=1, generation=0))


def _add_fetched_from(connection: Connection) -> None:
    """`_create_v1` creates the tables as `metadata` declares them now, so a database created
    since version 2 has the column already."""
    if "fetched_from" not in {column["name"] for column in inspect(connection)
                              .get_columns("adapters")}:
        connection.execute(text("ALTER TABLE adapters ADD COLUMN fetched_from TEXT"))


def _add_usage_and_tenant_limits(connection: Connection) -> None:
    """`checkfirst`, so the migration is safe wherever the tables exist already."""
    usage_hourly.create(connection, checkfirst=True)
    tenant_limits.create(connection, checkfirst=True)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _create_v1, 2: _add_fetched_from, 3: _add_usage_and_tenant_limits}
SCHEMA_VERSION = max(MIGRATIONS)
# Any fixed number: PostgreSQL's advisory lock that serialises migrations across replicas.
MIGRATION_LOCK = 0x646F7261


def migrate(connection: Connection) -> int:
    """Bring the schema up to `SCHEMA_VERSION` inside the caller's transaction; the version
    found before."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    schema_version.create(connection, checkfirst=True)
    found = connection.scalar(select(func.max(schema_version.c.version))) or 0
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(found)
    for version in range(found + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[version](connection)
        connection.execute(insert(schema_version).values(version=version,
                                                         applied_at=int(time.time())))
    return found
