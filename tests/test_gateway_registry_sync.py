"""The durable registry under the in-process one: what a restart brings back, how the adapters
directory relates to the registry, and registries of two replicas over one database (SQLite
here, fake vLLM backends; PostgreSQL and real processes: test_registry_replicas.py)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters.base_checkpoint import BaseCheckpoint
from adapters.compile import adapter_content_hash
from adapters.store import CompiledStore
from gateway.errors import Conflict, NotFound
from gateway.registry import AdapterRegistry, RegistryDatabase
from gateway.registry.artifacts import LocalArtifacts
from gateway.registry.database import RegistryUnreachable
from gateway.registry.entries import ADAPTERS_DIR, Origin
from gateway.registry.schema import SCHEMA_VERSION, SchemaTooNew
from gateway.upstream.pool import BackendPool
from tests.factories import LLAMA_TARGETS, random_adapter
from tests.gateway_fakes import FakeVllm, fake_transport

pytestmark = pytest.mark.anyio
ADMIN = "admin:test"


@dataclass
class Site:
    """Where replicas meet: the adapters directory, the database file, the shared store."""

    base: Path
    adapters_dir: Path
    database_url: str
    store: Path
    uploads: Path

    def replica(self, store: Path | None = None
                ) -> tuple[AdapterRegistry, FakeVllm, BackendPool]:
        vllm = FakeVllm()
        pool = BackendPool([vllm.url], httpx.AsyncClient(transport=fake_transport(vllm)))
        artifacts = LocalArtifacts(CompiledStore(store or self.store), self.uploads)
        registry = AdapterRegistry(BaseCheckpoint(self.base), artifacts, [self.adapters_dir], pool,
                                   RegistryDatabase.open(self.database_url), uploads=self.uploads)
        return registry, vllm, pool


@pytest.fixture
def site(llama_base, demo, tmp_path) -> Site:
    return Site(llama_base, shutil.copytree(demo, tmp_path / "adapters"),
                f"sqlite:///{tmp_path / 'registry.sqlite3'}", tmp_path / "store",
                tmp_path / "uploads")


def names(registry: AdapterRegistry) -> list[str]:
    return [entry.name for entry in registry.entries()]


async def test_a_restart_serves_what_was_served_even_without_the_directory(site):
    first, *_ = site.replica()
    await first.add_directory(site.adapters_dir)
    await first.add("caps2", "caps", added_by=ADMIN)
    await first.remove("pirate", removed_by=ADMIN)
    before = {entry.name: entry for entry in first.entries()}

    restarted, *_ = site.replica()
    assert await restarted.add_directory(site.adapters_dir) == []
    assert {entry.name: entry for entry in restarted.entries()} == before
    assert before["caps2"].origin == Origin.PATH and before["caps2"].added_by == ADMIN
    assert before["caps"].origin == Origin.DIRECTORY and before["caps"].added_by == ADAPTERS_DIR

    shutil.rmtree(site.adapters_dir / "plain")
    again, *_ = site.replica()
    await again.add_directory(site.adapters_dir)
    assert names(again) == ["caps", "caps2", "plain"]


async def test_the_directory_adds_new_adapters_and_replaces_changed_ones_but_not_removed_ones(
        site, llama_base):
    first, *_ = site.replica()
    await first.add_directory(site.adapters_dir)
    await first.remove("pirate", removed_by=ADMIN)
    old_caps = first.get("caps")
    shutil.rmtree(site.adapters_dir / "caps")
    random_adapter(llama_base, site.adapters_dir / "caps", seed=7, r=4, lora_alpha=8,
                   target_modules=LLAMA_TARGETS, use_dora=True)
    random_adapter(llama_base, site.adapters_dir / "fresh", seed=8, r=4, lora_alpha=8,
                   target_modules=LLAMA_TARGETS, use_dora=False)

    restarted, *_ = site.replica()
    changed = await restarted.add_directory(site.adapters_dir)
    assert [entry.name for entry in changed] == ["caps", "fresh"]
    assert names(restarted) == ["caps", "fresh", "plain"]
    caps = restarted.get("caps")
    assert caps.content_hash == adapter_content_hash(site.adapters_dir / "caps")
    assert caps.internal_name != old_caps.internal_name

    await restarted.add("pirate", "pirate", added_by=ADMIN)  # a removed name is free again
    await restarted.remove("pirate", removed_by=ADMIN)
    assert "pirate" not in names(site.replica()[0])


async def test_replicas_converge_on_adds_and_removals_and_unload_what_is_gone(site):
    a, *_ = site.replica()
    b, b_vllm, b_pool = site.replica()
    await a.add_directory(site.adapters_dir)
    assert await b.catch_up() and names(b) == names(a) == ["caps", "pirate", "plain"]
    assert not await b.catch_up()

    caps_on_b = b.get("caps")
    await b.ensure_loaded(caps_on_b, b_pool.backends[0])
    await a.add("caps2", "caps", added_by=ADMIN)
    await a.remove("caps", removed_by=ADMIN)
    assert await b.catch_up()
    assert names(b) == ["caps2", "pirate", "plain"]
    assert b_vllm.received("/v1/unload_lora_adapter") == [
        {"lora_name": caps_on_b.internal_name}]

    with pytest.raises(NotFound):
        await b.remove("caps", removed_by=ADMIN)
    await b.remove("caps2", removed_by=ADMIN)  # a's copy is stale until it catches up
    with pytest.raises(NotFound):
        await a.remove("caps2", removed_by=ADMIN)
    assert a.get("caps2") is None


async def test_concurrent_adds_of_one_name_give_one_adapter_and_one_conflict(site):
    a, *_ = site.replica()
    b, *_ = site.replica()
    results = await asyncio.gather(a.add("twin", "caps", added_by=ADMIN),
                                   b.add("twin", "pirate", added_by=ADMIN),
                                   return_exceptions=True)
    assert sorted(type(result).__name__ for result in results) == ["AdapterEntry", "Conflict"]
    winner = next(result for result in results if not isinstance(result, Conflict))
    await a.catch_up()
    await b.catch_up()
    assert a.get("twin").content_hash == b.get("twin").content_hash == winner.content_hash


async def test_an_artifact_missing_from_a_replicas_store_is_compiled_there(site, tmp_path):
    a, *_ = site.replica()
    await a.add_directory(site.adapters_dir)
    b, *_ = site.replica(store=tmp_path / "other-store")
    await b.sync()
    caps = b.get("caps")
    assert Path(caps.location).parent == tmp_path / "other-store"
    assert caps.artifact == a.get("caps").artifact


def test_a_registry_schema_newer_than_the_gateway_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.sqlite3'}"
    RegistryDatabase.open(url).close()
    with sqlite3.connect(tmp_path / "registry.sqlite3") as connection:
        connection.execute("INSERT INTO schema_version VALUES (99, 0)")
    with pytest.raises(SchemaTooNew, match="schema is version 99"):
        RegistryDatabase.open(url)


# The tables as version 1 of the schema created them (before `fetched_from`).
SCHEMA_V1 = """
CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL);
CREATE TABLE adapters (name TEXT PRIMARY KEY, origin TEXT NOT NULL, source TEXT NOT NULL,
    content_hash TEXT NOT NULL, artifact TEXT NOT NULL, is_dora BOOLEAN NOT NULL,
    compile_seconds FLOAT NOT NULL, added_by TEXT NOT NULL, added_at BIGINT NOT NULL);
CREATE TABLE removed_adapters (name TEXT PRIMARY KEY, removed_by TEXT NOT NULL,
    removed_at BIGINT NOT NULL);
CREATE TABLE registry_generation (id INTEGER PRIMARY KEY, generation BIGINT NOT NULL);
INSERT INTO registry_generation VALUES (1, 7);
INSERT INTO schema_version VALUES (1, 0);
INSERT INTO adapters VALUES ('caps', 'path', '/adapters/caps', 'abc', 'abc-def-v1', 1, 0.5,
    'admin:0123', 1700000000);
"""


def test_a_version_1_registry_is_migrated_and_keeps_its_adapters(tmp_path):
    path = tmp_path / "registry.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.executescript(SCHEMA_V1)
    database = RegistryDatabase.open(f"sqlite:///{path}")
    try:
        snapshot = database.snapshot()
    finally:
        database.close()
    assert snapshot.generation == 7
    caps = snapshot.adapters["caps"]
    assert (caps.source, caps.artifact, caps.fetched_from) == ("/adapters/caps", "abc-def-v1",
                                                               None)
    with sqlite3.connect(path) as connection:
        versions = connection.execute("SELECT version FROM schema_version").fetchall()
    assert versions == [(version,) for version in range(1, SCHEMA_VERSION + 1)]


def test_an_unreadable_registry_is_a_clear_error_at_start(tmp_path):
    (tmp_path / "registry.sqlite3").write_text("not a database")
    with pytest.raises(RegistryUnreachable, match="cannot open the registry sqlite:///"):
        RegistryDatabase.open(f"sqlite:///{tmp_path / 'registry.sqlite3'}")
