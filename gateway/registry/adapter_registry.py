"""The adapters this gateway serves, in memory: name -> validated, compiled adapter.

The durable registry (`database.py`) is the truth; this is the process's copy that requests
read, so a database that is down stops admin changes only. Every change is written there
before it shows here, and `sync` brings the copy to the database's state (at start, and when
another replica changed it). An adapter is served under an internal name that carries its
content hash, so a replaced adapter never reuses vLLM's prefix cache or a stale loaded copy.
Adding is all-or-nothing: validation, compilation and publishing (into the content-addressed
store, `artifacts.py`) come before the row is written, and paths must lie under a configured
root after resolving symlinks. Admission (`gateway.engine.admission`) refuses, before
compiling, what the configured engines cannot serve; an adapter that an engine still
refuses at load time stays registered but unservable, with the engine's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from adapters import paths
from adapters.base_checkpoint import BaseCheckpoint
from adapters.compile import adapter_content_hash
from adapters.errors import AdapterError, DoraGatewayError, SourceError
from adapters.peft_adapter import CONFIG_FILE
from gateway.engine.admission import engine_refusals, validation_problems
from gateway.engine.limits import VLLM_DEFAULTS, EngineLimits
from gateway.errors import (
    AdapterUnavailable,
    Conflict,
    InvalidAdapter,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    RegistryUnavailable,
    source_error,
)
from gateway.registry.artifacts import ArtifactStore
from gateway.registry.database import RegistryDatabase, Snapshot, StoredAdapter
from gateway.registry.entries import ADAPTERS_DIR, AdapterEntry, Origin, check_name
from gateway.registry.sources import FetchedAdapter
from gateway.upstream.lora_loader import LoraLoader, Refusal
from gateway.upstream.pool import Backend, BackendPool

T = TypeVar("T")
log = logging.getLogger(__name__)


class RegistryObserver(Protocol):
    def adapter_compiled(self, entry: AdapterEntry) -> None: ...

    def adapter_loaded(self, entry: AdapterEntry, seconds: float) -> None: ...

    def adapter_refused(self, entry: AdapterEntry, refusal: Refusal) -> None: ...


class AdapterRegistry:
    """`artifacts` is where compiled artifacts and kept adapters live; `roots[0]` is the
    adapters directory; relative paths given to `add` resolve there; `database` is the
    durable registry; `limits` are what the engines behind `pool` accept; `uploads` is where
    uploads land (a root too)."""

    def __init__(self, base: BaseCheckpoint, artifacts: ArtifactStore, roots: Sequence[Path],
                 pool: BackendPool, database: RegistryDatabase,
                 limits: EngineLimits = VLLM_DEFAULTS, *, uploads: Path | None = None) -> None:
        if not roots:
            raise ValueError("at least one adapter root is needed")
        self._base = base
        self._artifacts = artifacts
        self._database = database
        self._limits = limits
        self.uploads = uploads or paths.uploads_dir()
        self._roots = [Path(root) for root in (*roots, self.uploads)]
        self._real_roots = [os.path.realpath(root) for root in self._roots]
        self._loader = LoraLoader(pool, on_loaded=self._loaded, on_refused=self._refused)
        self._entries: dict[str, AdapterEntry] = {}
        self._generation: int | None = None
        self._lock = asyncio.Lock()
        self._observers: list[RegistryObserver] = []

    @property
    def database(self) -> RegistryDatabase:
        """The durable registry, which also keeps the tenants' limits and usage."""
        return self._database

    def add_observer(self, observer: RegistryObserver) -> None:
        """Tell `observer` of every compile (those already done included) and load."""
        self._observers.append(observer)
        for entry in self.entries():
            observer.adapter_compiled(entry)

    def get(self, name: str) -> AdapterEntry | None:
        return self._entries.get(name)

    def entries(self) -> list[AdapterEntry]:
        return sorted(self._entries.values(), key=lambda entry: entry.name)

    def loaded_on(self, entry: AdapterEntry) -> list[str]:
        return self._loader.loaded_on(entry.internal_name)

    def refusal(self, entry: AdapterEntry) -> Refusal | None:
        """Why a backend refused to load `entry`; None while it is servable."""
        return self._loader.refusal(entry.internal_name)

    def forget_backend(self, url: str) -> None:
        """For a backend that restarted: it has none of the adapters it had before."""
        self._loader.forget_backend(url)

    def confine(self, path: str | Path) -> Path:
        """The real path of `path` if it lies under a configured root, else a 400.

        A relative `path` is relative to the adapters directory (an absolute one replaces it
        in the join)."""
        try:
            real = os.path.realpath(self._roots[0] / path)
        except ValueError:
            real = None
        if real and any(os.path.commonpath([root, real]) == root for root in self._real_roots):
            return Path(real)
        raise InvalidRequest(f"The path '{path}' is not under a configured adapter root",
                             param="path", code="path_not_allowed")

    async def is_taken(self, name: str) -> bool:
        """Whether the durable registry has `name` (503 while it cannot be asked)."""
        return await _blocking(self._database.exists, name)

    async def add(self, name: str, path: str | Path, *, added_by: str,
                  origin: Origin = Origin.PATH, load_on: Sequence[Backend] = ()) -> AdapterEntry:
        """Validate and compile the adapter at `path`, register it as `name`, then load it on
        `load_on` (eager loading); if any step fails, nothing stays registered or loaded."""
        check_name(name)
        return await self._add(name, self.confine(path), origin, added_by, load_on)

    async def add_fetched(self, name: str, fetched: FetchedAdapter, *, added_by: str,
                          load_on: Sequence[Backend] = ()) -> AdapterEntry:
        """`add` for an adapter fetched from a URL (`sources.py`): its files are kept in the
        store, and the row records where they came from."""
        check_name(name)
        return await self._add(name, fetched.directory, Origin.URL, added_by, load_on,
                               fetched_from=fetched.description)

    async def _add(self, name: str, source: Path, origin: Origin, added_by: str,
                   load_on: Sequence[Backend], fetched_from: str | None = None) -> AdapterEntry:
        async with self._lock:
            if await self.is_taken(name):
                raise Conflict(f"An adapter named '{name}' already exists", param="name",
                               code="adapter_exists")
            entry = await asyncio.to_thread(self._compile, name, source, origin, added_by,
                                            fetched_from)
            await _blocking(self._database.add, self._stored(entry))
            await self._show(entry)
            for observer in self._observers:
                observer.adapter_compiled(entry)
            try:
                for backend in load_on:
                    await self.ensure_loaded(entry, backend)
            except BaseException:
                await self._hide(name)
                with contextlib.suppress(RegistryUnavailable):
                    await _blocking(self._database.discard, name)
                raise
        return entry

    async def add_directory(self, directory: Path) -> list[AdapterEntry]:
        """At start: serve what the durable registry holds, then register each subdirectory
        of `directory` holding an adapter config under its name, unless the registry has that
        name or an admin removed it; a registered one whose files changed is compiled again
        and replaces its entry. Hidden subdirectories are skipped. The adapters registered
        or replaced here are returned."""
        snapshot = await self.sync()
        subdirectories = sorted(path for path in directory.iterdir()
                                if (path / CONFIG_FILE).is_file()
                                and not path.name.startswith("."))
        changed = []
        for path in subdirectories:
            stored = snapshot.adapters.get(path.name)
            if path.name in snapshot.removed:
                continue
            if stored is None:
                with contextlib.suppress(Conflict):  # another replica registered it first
                    changed.append(await self.add(path.name, path, origin=Origin.DIRECTORY,
                                                  added_by=ADAPTERS_DIR))
            elif await self._directory_changed(stored, path):
                changed.append(await self._replace(stored.name, path))
        await self.sync()
        return changed

    async def remove(self, name: str, *, removed_by: str) -> None:
        """Unregister `name` (also if only another replica has shown it yet) and free its
        slot on every backend that loaded it."""
        async with self._lock:
            try:
                await _blocking(self._database.remove, name, removed_by)
            except NotFound:
                await self._hide(name)  # a stale copy: removed through another replica
                raise
            await self._hide(name)

    async def sync(self) -> Snapshot:
        """Make this copy the durable registry's: entries it lacks appear, entries gone or
        replaced there are unloaded and dropped."""
        async with self._lock:
            snapshot = await _blocking(self._database.snapshot)
            for name, entry in list(self._entries.items()):
                stored = snapshot.adapters.get(name)
                if stored is None or stored.content_hash != entry.content_hash:
                    await self._hide(name)
            for stored in snapshot.adapters.values():
                if stored.name not in self._entries:
                    entry = await asyncio.to_thread(self._from_stored, stored)
                    if entry is not None:
                        self._entries[entry.name] = entry
            self._generation = snapshot.generation
        return snapshot

    async def catch_up(self) -> bool:
        """`sync` if the durable registry changed since the last one; whether it had."""
        if await _blocking(self._database.generation) == self._generation:
            return False
        await self.sync()
        return True

    async def ensure_loaded(self, entry: AdapterEntry, backend: Backend) -> None:
        """Load `entry` on `backend` once; 404 if it was removed in the meantime."""
        loaded = await self._loader.ensure_loaded(
            entry.internal_name, entry.location, backend,
            still_wanted=lambda: self._entries.get(entry.name) is entry)
        if not loaded:
            raise ModelNotFound(entry.name)

    async def load_all(self, backend: Backend) -> None:
        """Eager loading: every adapter onto `backend` now rather than on first use; one the
        backend refuses is left unservable and the others still load."""
        for entry in self.entries():
            with contextlib.suppress(AdapterUnavailable):
                await self.ensure_loaded(entry, backend)

    def _loaded(self, internal_name: str, seconds: float) -> None:
        entry = self._by_internal_name(internal_name)
        if entry is not None:
            for observer in self._observers:
                observer.adapter_loaded(entry, seconds)

    def _refused(self, internal_name: str, refusal: Refusal) -> None:
        entry = self._by_internal_name(internal_name)
        if entry is not None:
            for observer in self._observers:
                observer.adapter_refused(entry, refusal)

    def _by_internal_name(self, internal_name: str) -> AdapterEntry | None:
        return next((entry for entry in self._entries.values()
                     if entry.internal_name == internal_name), None)

    async def _show(self, entry: AdapterEntry) -> None:
        """Serve `entry` here, in place of a stale entry of the same name."""
        if self._entries.get(entry.name) is not None:
            await self._hide(entry.name)
        self._entries[entry.name] = entry

    async def _hide(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            await self._loader.unload_everywhere(entry.internal_name)

    async def _directory_changed(self, stored: StoredAdapter, path: Path) -> bool:
        """Whether `path` is where the directory adapter `stored` came from and its files
        changed since."""
        if stored.origin != Origin.DIRECTORY or stored.source != os.path.realpath(path):
            return False
        return await asyncio.to_thread(adapter_content_hash, path) != stored.content_hash

    async def _replace(self, name: str, path: Path) -> AdapterEntry:
        async with self._lock:
            entry = await asyncio.to_thread(self._compile, name, self.confine(path),
                                            Origin.DIRECTORY, ADAPTERS_DIR, None)
            await _blocking(self._database.replace, self._stored(entry))
            await self._show(entry)
        for observer in self._observers:
            observer.adapter_compiled(entry)
        return entry

    def _stored(self, entry: AdapterEntry) -> StoredAdapter:
        return StoredAdapter(
            name=entry.name, origin=entry.origin.value, source=entry.source,
            content_hash=entry.content_hash, artifact=entry.artifact,
            is_dora=entry.is_dora, compile_seconds=entry.compile_seconds,
            added_by=entry.added_by, added_at=entry.created, fetched_from=entry.fetched_from)

    def _from_stored(self, stored: StoredAdapter) -> AdapterEntry | None:
        """The entry for a row; its artifact is compiled (and published) here again only if
        the store lacks it or it was compiled for another base model. None (logged) if that
        fails."""
        compiled = self._artifacts.compiled
        artifact = compiled.entry_path(stored.content_hash, self._base.fingerprint()).name
        try:
            location = (self._artifacts.location(artifact) if artifact == stored.artifact
                        else None)
            if location is None:
                with self._artifacts.open_kept(stored.source) as directory:
                    location = self._artifacts.publish(compiled.compile(directory,
                                                                        self._base).path)
        except (DoraGatewayError, OSError) as exc:
            log.error("cannot serve the registered adapter %r here: its artifact %s is not in "
                      "the store and compiling %s failed: %s", stored.name, artifact,
                      stored.source, exc)
            return None
        return AdapterEntry(
            name=stored.name, source=stored.source, content_hash=stored.content_hash,
            artifact=artifact, location=location, is_dora=stored.is_dora,
            compile_seconds=stored.compile_seconds, created=stored.added_at,
            origin=Origin(stored.origin), added_by=stored.added_by,
            fetched_from=stored.fetched_from)

    def _compile(self, name: str, source: Path, origin: Origin, added_by: str,
                 fetched_from: str | None) -> AdapterEntry:
        """Validate, compile and publish; an adapter from outside the roots is kept in the
        store, so its row points at bytes every gateway can read again."""
        started = time.perf_counter()
        refusals = engine_refusals(source, self._base, self._limits)
        if refusals:
            problems = validation_problems(source, self._base) + refusals
            raise InvalidAdapter(str(AdapterError(str(source), problems)), problems)
        try:
            stored = self._artifacts.compiled.compile(source, self._base)
            location = self._artifacts.publish(stored.path)
            kept = (self._artifacts.keep(source) if origin in (Origin.UPLOAD, Origin.URL)
                    else str(source))
        except AdapterError as exc:
            raise InvalidAdapter(str(exc), exc.problems) from exc
        except SourceError as exc:
            raise source_error(exc) from exc
        return AdapterEntry(name=name, source=kept, content_hash=stored.adapter_hash,
                            artifact=stored.path.name, location=location,
                            is_dora=stored.is_dora,
                            compile_seconds=time.perf_counter() - started,
                            created=int(time.time()), origin=origin, added_by=added_by,
                            fetched_from=fetched_from)


async def _blocking(call: Callable[..., T], *args: object) -> T:
    """A database call, off the event loop."""
    return await asyncio.to_thread(call, *args)


