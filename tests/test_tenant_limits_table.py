"""Admin-set tenant limits over a real database (SQLite and PostgreSQL): written, overwritten,
deleted, and seen by another replica's connection."""

from __future__ import annotations

from collections.abc import Iterator
from uuid import uuid4

import pytest
from sqlalchemy import create_engine

from gateway.errors import RegistryUnavailable
from gateway.registry import RegistryDatabase
from gateway.registry.tenant_limits import StoredLimits, TenantLimitsTable
from tests.postgres_server import PostgresServer


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    return request.getfixturevalue("postgres").create_database(f"limits_{uuid4().hex}")


@pytest.fixture
def tables(database_url) -> Iterator[tuple[TenantLimitsTable, TenantLimitsTable]]:
    """Two replicas' tables on the test's database."""
    databases = [RegistryDatabase.open(database_url) for _ in range(2)]
    try:
        yield TenantLimitsTable(databases[0].engine), TenantLimitsTable(databases[1].engine)
    finally:
        for database in databases:
            database.close()


ACME = StoredLimits("acme", requests_per_minute=60, tokens_per_minute=None,
                    token_budget=1_000_000, budget_period="month", updated_by="admin:0123",
                    updated_at=1796324400)
GLOBEX = StoredLimits("globex", requests_per_minute=None, tokens_per_minute=5000,
                      token_budget=None, budget_period=None, updated_by="admin:0123",
                      updated_at=1796324401)


def test_limits_are_put_overwritten_and_deleted(tables):
    a, b = tables
    assert a.all() == {}
    a.put(ACME)
    a.put(GLOBEX)
    assert b.all() == {"acme": ACME, "globex": GLOBEX}

    lowered = StoredLimits("acme", requests_per_minute=None, tokens_per_minute=100,
                           token_budget=50, budget_period="day", updated_by="admin:4567",
                           updated_at=1796324500)
    b.put(lowered)
    assert a.all() == {"acme": lowered, "globex": GLOBEX}

    assert a.delete("acme")
    assert not b.delete("acme")
    assert b.all() == {"globex": GLOBEX}


def test_an_unreachable_database_is_unavailable():
    closed = TenantLimitsTable(create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none"))
    for call in (closed.all, lambda: closed.put(ACME), lambda: closed.delete("acme")):
        with pytest.raises(RegistryUnavailable):
            call()
