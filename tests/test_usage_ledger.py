"""The usage ledger over a real database (SQLite and PostgreSQL): what is added is written
once, replicas add up, a database outage loses nothing; its CSV and time formats; and the
schema migration that created its table."""

from __future__ import annotations

import csv
import io
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from uuid import uuid4

import pytest
from sqlalchemy import Engine, create_engine, inspect

from gateway.errors import RegistryUnavailable
from gateway.registry import RegistryDatabase
from gateway.usage import UsageLedger
from gateway.usage.report import hour_iso, parse_time, usage_csv
from tests.postgres_server import PostgresServer, TcpRelay

H19 = 1796324400  # 2026-12-03T19:00:00Z
H20 = H19 + 3600
H21 = H20 + 3600
ALL = ("tenant", "adapter", "hour")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
    return request.getfixturevalue("postgres").create_database(f"usage_{uuid4().hex}")


@pytest.fixture
def open_engine(database_url) -> Iterator[Callable[[], Engine]]:
    """Opens the test's database once per call, as a gateway replica does."""
    databases: list[RegistryDatabase] = []

    def open_() -> Engine:
        databases.append(RegistryDatabase.open(database_url))
        return databases[-1].engine

    yield open_
    for database in databases:
        database.close()


def totals(requests: int, errors: int, prompt: int, completion: int) -> dict:
    return {"requests": requests, "errors": errors, "prompt_tokens": prompt,
            "completion_tokens": completion, "total_tokens": prompt + completion}


def test_flushed_usage_is_summed_per_tenant_adapter_and_hour(open_engine):
    ledger = UsageLedger(open_engine(), clock=Clock(H19 + 5))
    ledger.add("acme", "caps", ok=True, prompt_tokens=10, completion_tokens=3)
    ledger.add("acme", "caps", ok=False, prompt_tokens=None, completion_tokens=None)
    ledger.add("globex", "base", ok=True, prompt_tokens=7, completion_tokens=None)
    assert ledger.pending_requests() == 3
    assert ledger.flush() == 2
    assert ledger.pending_requests() == 0
    assert ledger.flush() == 0
    assert ledger.query(tenant=None, start=H19, end=H20, group_by=ALL) == [
        {"tenant": "acme", "adapter": "caps", "hour": H19, **totals(2, 1, 10, 3)},
        {"tenant": "globex", "adapter": "base", "hour": H19, **totals(1, 0, 7, 0)}]


def test_two_replicas_flushing_one_database_add_up(open_engine):
    a = UsageLedger(open_engine(), clock=Clock(H19))
    b = UsageLedger(open_engine(), clock=Clock(H19 + 60))
    for ledger in (a, b, a):
        ledger.add("acme", "caps", ok=True, prompt_tokens=5, completion_tokens=1)
        ledger.flush()
    assert b.query(tenant="acme", start=H19, end=H20, group_by=ALL) == [
        {"tenant": "acme", "adapter": "caps", "hour": H19, **totals(3, 0, 15, 3)}]


def test_an_hour_boundary_starts_a_new_row_and_end_is_exclusive(open_engine):
    clock = Clock(H20 - 1)
    ledger = UsageLedger(open_engine(), clock=clock)
    ledger.add("acme", "caps", ok=True, prompt_tokens=1, completion_tokens=1)
    clock.now = H20
    ledger.add("acme", "caps", ok=True, prompt_tokens=2, completion_tokens=2)
    assert ledger.flush() == 2
    assert ledger.query(tenant=None, start=H19, end=H21, group_by=["hour"]) == [
        {"hour": H19, **totals(1, 0, 1, 1)}, {"hour": H20, **totals(1, 0, 2, 2)}]
    assert ledger.query(tenant=None, start=H19, end=H20, group_by=["hour"]) == [
        {"hour": H19, **totals(1, 0, 1, 1)}]
    assert ledger.query(tenant=None, start=H19 + 1, end=H21 + 1, group_by=["hour"]) == [
        {"hour": H20, **totals(1, 0, 2, 2)}]


def test_grouping_and_the_tenant_filter(open_engine):
    clock = Clock(H19)
    ledger = UsageLedger(open_engine(), clock=clock)
    for tenant, adapter, now in [("acme", "caps", H19), ("acme", "pirate", H19),
                                 ("globex", "caps", H20), ("acme", "caps", H20)]:
        clock.now = now
        ledger.add(tenant, adapter, ok=True, prompt_tokens=10, completion_tokens=1)
    ledger.flush()

    def query(group_by: list[str], tenant: str | None = None, end: int = H21) -> list[dict]:
        return ledger.query(tenant=tenant, start=H19, end=end, group_by=group_by)

    assert query([]) == [totals(4, 0, 40, 4)]
    assert query([], tenant="globex") == [totals(1, 0, 10, 1)]
    assert query(["adapter"]) == [{"adapter": "caps", **totals(3, 0, 30, 3)},
                                  {"adapter": "pirate", **totals(1, 0, 10, 1)}]
    assert query(["hour", "tenant"]) == [
        {"tenant": "acme", "hour": H19, **totals(2, 0, 20, 2)},
        {"tenant": "acme", "hour": H20, **totals(1, 0, 10, 1)},
        {"tenant": "globex", "hour": H20, **totals(1, 0, 10, 1)}]
    assert query(["tenant"], tenant="acme", end=H20) == [
        {"tenant": "acme", **totals(2, 0, 20, 2)}]
    assert query([], tenant="initech") == query(["tenant"], tenant="initech") == []
    assert query([], end=H19) == []


def test_an_unknown_group_field_is_a_clear_error():
    ledger = UsageLedger(create_engine("sqlite://"))
    with pytest.raises(ValueError, match="cannot group usage by model: group by any of "
                                         "tenant, adapter, hour"):
        ledger.query(tenant=None, start=0, end=H19, group_by=["tenant", "model"])


@pytest.fixture
def relayed(postgres) -> Iterator[tuple[TcpRelay, Engine]]:
    """An engine on a fresh database through a relay the test can cut."""
    name = f"usage_{uuid4().hex}"
    postgres.create_database(name)
    relay = TcpRelay(postgres.port)
    relay.restore()
    database = RegistryDatabase.open(postgres.url(name, port=relay.port))
    try:
        yield relay, database.engine
    finally:
        database.close()
        relay.cut()


def test_a_failed_flush_keeps_its_totals_and_the_next_writes_them_once(relayed):
    relay, engine = relayed
    ledger = UsageLedger(engine, clock=Clock(H19))
    ledger.add("acme", "caps", ok=True, prompt_tokens=1, completion_tokens=1)
    ledger.flush()
    ledger.add("acme", "caps", ok=True, prompt_tokens=10, completion_tokens=10)
    ledger.add("acme", "pirate", ok=False, prompt_tokens=None, completion_tokens=None)
    relay.cut()
    with pytest.raises(RegistryUnavailable):
        ledger.flush()
    assert ledger.pending_requests() == 2
    ledger.add("acme", "caps", ok=True, prompt_tokens=100, completion_tokens=100)
    with pytest.raises(RegistryUnavailable):
        ledger.flush()
    relay.restore()
    assert ledger.flush() == 2
    assert ledger.pending_requests() == 0
    assert ledger.query(tenant=None, start=H19, end=H20, group_by=["adapter"]) == [
        {"adapter": "caps", **totals(3, 0, 111, 111)},
        {"adapter": "pirate", **totals(1, 1, 0, 0)}]


def test_concurrent_flushes_of_two_replicas_sum_exactly(open_engine):
    ledgers = [UsageLedger(open_engine(), clock=Clock(H19)) for _ in range(2)]
    start = threading.Barrier(len(ledgers))
    rounds = 40

    def serve(ledger: UsageLedger) -> None:
        start.wait()
        for _ in range(rounds):
            for adapter in ("caps", "pirate", "brief"):
                ledger.add("acme", adapter, ok=True, prompt_tokens=3, completion_tokens=2)
            ledger.flush()

    with ThreadPoolExecutor(len(ledgers)) as pool:
        for future in [pool.submit(serve, ledger) for ledger in ledgers]:
            future.result()
    count = rounds * len(ledgers)
    assert ledgers[0].query(tenant="acme", start=H19, end=H20, group_by=["adapter"]) == [
        {"adapter": adapter, **totals(count, 0, 3 * count, 2 * count)}
        for adapter in ("brief", "caps", "pirate")]


def test_csv_reads_back_as_the_rows():
    rows = [{"tenant": 'acme, "inc"', "adapter": "caps", "hour": H19, **totals(2, 1, 10, 3)},
            {"tenant": "globex", "adapter": "base", "hour": H20, **totals(1, 0, 7, 0)}]
    read = list(csv.DictReader(io.StringIO(usage_csv(rows, ALL))))
    assert read == [{**row, "hour": hour_iso(row["hour"]),
                     **{name: str(value) for name, value in row.items()
                        if name not in ALL}} for row in rows]
    assert read[0]["hour"] == "2026-12-03T19:00:00Z"
    assert usage_csv([totals(1, 0, 2, 3)], []).splitlines() == [
        "requests,errors,prompt_tokens,completion_tokens,total_tokens", "1,0,2,3,5"]


@pytest.mark.parametrize(("value", "seconds"), [
    ("1796324400", H19), (" 1796324400 ", H19), ("2026-12-03T19:00:00Z", H19),
    ("2026-12-03T19:00:00", H19), ("2026-12-03T20:00:00+01:00", H19),
    ("2026-12-03T19:00:00.9Z", H19), ("2026-12-03", H19 - 19 * 3600)])
def test_parse_time_reads_unix_seconds_and_iso_8601(value, seconds):
    assert parse_time(value) == seconds


@pytest.mark.parametrize("value", ["", "yesterday", "-5", "12.5", "2026-13-01", "²"])
def test_parse_time_refuses_anything_else_clearly(value):
    with pytest.raises(ValueError, match="is not a time: give Unix seconds"):
        parse_time(value)


# The tables as version 2 of the schema created them (before usage and tenant limits).
SCHEMA_V2 = """
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL);
CREATE TABLE adapters (name TEXT PRIMARY KEY, origin TEXT NOT NULL, source TEXT NOT NULL,
    content_hash TEXT NOT NULL, artifact TEXT NOT NULL, is_dora BOOLEAN NOT NULL,
    compile_seconds FLOAT NOT NULL, added_by TEXT NOT NULL, added_at BIGINT NOT NULL,
    fetched_from TEXT);
CREATE TABLE removed_adapters (name TEXT PRIMARY KEY, removed_by TEXT NOT NULL,
    removed_at BIGINT NOT NULL);
CREATE TABLE registry_generation (id INTEGER PRIMARY KEY, generation BIGINT NOT NULL);
INSERT INTO registry_generation VALUES (1, 4);
INSERT INTO schema_version VALUES (1, 0), (2, 0);
INSERT INTO adapters VALUES ('caps', 'url', 'https://example.com/caps', 'abc', 'abc-def-v1',
    1, 0.5, 'admin:0123', 1700000000, 'https://example.com/caps@main');
"""


def test_a_version_2_registry_gains_the_usage_and_limits_tables_and_keeps_its_adapters(
        tmp_path):
    path = tmp_path / "registry.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.executescript(SCHEMA_V2)
    database = RegistryDatabase.open(f"sqlite:///{path}")
    try:
        snapshot = database.snapshot()
        tables = set(inspect(database.engine).get_table_names())
        ledger = UsageLedger(database.engine, clock=Clock(H19))
        ledger.add("acme", "caps", ok=True, prompt_tokens=1, completion_tokens=2)
        ledger.flush()
        assert ledger.query(tenant=None, start=H19, end=H20, group_by=[]) == [
            totals(1, 0, 1, 2)]
    finally:
        database.close()
    assert {"usage_hourly", "tenant_limits"} <= tables
    assert snapshot.generation == 4
    assert snapshot.adapters["caps"].fetched_from == "https://example.com/caps@main"
    with sqlite3.connect(path) as connection:
        versions = connection.execute("SELECT version FROM schema_version").fetchall()
    assert versions == [(1,), (2,), (3,)]
