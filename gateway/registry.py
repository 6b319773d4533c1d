"""The adapters the gateway serves: name -> validated, compiled adapter.

An adapter is served under an internal name that carries its content hash, so a replaced
adapter never reuses vLLM's prefix cache or a stale loaded copy. Adding is all-or-nothing:
validation and compilation (cached in the content-addressed store) happen before the entry
appears, and paths must lie under a configured root after resolving symlinks. Admission
(`gateway.engine.admission`) refuses, before compiling, what the configured engines cannot serve;
an adapter that an engine still refuses at load time stays registered but unservable, with
the engine's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapters.base_checkpoint import BaseCheckpoint
from adapters.errors import AdapterError
from adapters.peft_adapter import CONFIG_FILE
from adapters.store import CompiledStore
from gateway.engine.admission import engine_refusals, validation_problems
from gateway.engine.limits import VLLM_DEFAULTS, EngineLimits
from gateway.errors import (
    AdapterUnavailable,
    Conflict,
    InvalidAdapter,
    InvalidRequest,
    ModelNotFound,
    NotFound,
)
from gateway.names import BASE_MODEL, NAME_RULE, valid_name
from gateway.upstream.lora_loader import LoraLoader, Refusal
from gateway.upstream.pool import Backend, BackendPool


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    source: Path
    content_hash: str
    compiled_path: Path
    is_dora: bool
    compile_seconds: float
    created: int

    @property
    def internal_name(self) -> str:
        return f"{self.name}--{self.content_hash[:16]}"


class RegistryObserver(Protocol):
    def adapter_compiled(self, entry: AdapterEntry) -> None: ...

    def adapter_loaded(self, entry: AdapterEntry, seconds: float) -> None: ...

    def adapter_refused(self, entry: AdapterEntry, refusal: Refusal) -> None: ...


class AdapterRegistry:
    """`roots[0]` is the adapters directory; relative paths given to `add` resolve there;
    `limits` are what the engines behind `pool` accept."""

    def __init__(self, base: BaseCheckpoint, store: CompiledStore, roots: Sequence[Path],
                 pool: BackendPool, limits: EngineLimits = VLLM_DEFAULTS) -> None:
        if not roots:
            raise ValueError("at least one adapter root is needed")
        self._base = base
        self._store = store
        self._limits = limits
        self._roots = [Path(root) for root in roots]
        self._real_roots = [os.path.realpath(root) for root in roots]
        self._loader = LoraLoader(pool, on_loaded=self._loaded, on_refused=self._refused)
        self._entries: dict[str, AdapterEntry] = {}
        self._lock = asyncio.Lock()
        self._observers: list[RegistryObserver] = []

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

    async def add(self, name: str, path: str | Path, *,
                  load_on: Sequence[Backend] = ()) -> AdapterEntry:
        """Validate and compile the adapter at `path`, load it on `load_on` (eager loading),
        then serve it as `name`; if any step fails, nothing stays registered or loaded."""
        check_name(name)
        source = self.confine(path)
        async with self._lock:
            if name in self._entries:
                raise Conflict(f"An adapter named '{name}' already exists", param="name",
                               code="adapter_exists")
            entry = await asyncio.to_thread(self._compile, name, source)
            self._entries[name] = entry
            for observer in self._observers:
                observer.adapter_compiled(entry)
            try:
                for backend in load_on:
                    await self.ensure_loaded(entry, backend)
            except BaseException:
                del self._entries[name]
                await self._loader.unload_everywhere(entry.internal_name)
                raise
        return entry

    async def add_directory(self, directory: Path) -> list[AdapterEntry]:
        """Every subdirectory holding an adapter config, named after it (hidden ones, such
        as unfinished uploads, are skipped)."""
        subdirectories = sorted(path for path in directory.iterdir()
                                if (path / CONFIG_FILE).is_file()
                                and not path.name.startswith("."))
        return [await self.add(path.name, path) for path in subdirectories]

    async def remove(self, name: str) -> AdapterEntry:
        """Stop serving `name` and free its slot on every backend that loaded it."""
        async with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                raise NotFound(f"No adapter named '{name}'", param="name",
                               code="adapter_not_found")
            await self._loader.unload_everywhere(entry.internal_name)
        return entry

    async def ensure_loaded(self, entry: AdapterEntry, backend: Backend) -> None:
        """Load `entry` on `backend` once; 404 if it was removed in the meantime."""
        loaded = await self._loader.ensure_loaded(
            entry.internal_name, entry.compiled_path, backend,
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

    def _compile(self, name: str, source: Path) -> AdapterEntry:
        started = time.perf_counter()
        refusals = engine_refusals(source, self._base, self._limits)
        if refusals:
            problems = validation_problems(source, self._base) + refusals
            raise InvalidAdapter(str(AdapterError(str(source), problems)), problems)
        try:
            stored = self._store.compile(source, self._base)
        except AdapterError as exc:
            raise InvalidAdapter(str(exc), exc.problems) from exc
        return AdapterEntry(name=name, source=source, content_hash=stored.adapter_hash,
                            compiled_path=stored.path, is_dora=stored.is_dora,
                            compile_seconds=time.perf_counter() - started,
                            created=int(time.time()))


def check_name(name: str) -> None:
    if not valid_name(name) or name == BASE_MODEL:
        raise InvalidRequest(f"Invalid adapter name '{name}': use {NAME_RULE}, and not "
                             f"'{BASE_MODEL}'", param="name", code="invalid_adapter_name")
