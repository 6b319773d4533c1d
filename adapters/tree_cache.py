"""A local, size-bounded cache of trees fetched from object storage, shared by every process
on one host (the gateway and each vLLM worker).

Tree URLs are content-addressed, so an entry (`root/<sha256 of the URL>`) never changes: it is
fetched into a hidden staging directory and renamed into place, complete or not at all. Each
entry has a lock file in `root/.locks`: whoever fetches holds it exclusively (so concurrent
opens of one URL fetch once), and whoever uses an entry holds it shared, which an evictor's
non-blocking exclusive lock cannot take: an entry in use is never removed. Lock files are
never removed either (a few bytes each), so two processes never lock different files for one
entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from adapters import paths
from adapters.object_store import fetch_tree

CACHE_DIR_ENV = "DORA_GATEWAY_CACHE_DIR"
CACHE_MAX_BYTES_ENV = "DORA_GATEWAY_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 10 * 1024**3
STAGING_PREFIX = ".incoming-"
STALE_STAGING_S = 3600
ENTRY_ID_CHARS = 40
ENTRY_NAME = re.compile(f"[0-9a-f]{{{ENTRY_ID_CHARS}}}")

Fetch = Callable[[str, Path], None]


class CachedTree:
    """A tree in the cache, kept there (not evicted) until `release`."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the file drops its shared lock
            self._lock_fd = None

    def __enter__(self) -> CachedTree:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


class TreeCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def open(self, url: str, fetch: Fetch = fetch_tree) -> CachedTree:
        """The tree at `url`, fetched on a miss, held until released. A failed fetch raises
        its own error and leaves nothing behind."""
        entry_id = hashlib.sha256(url.encode()).hexdigest()[:ENTRY_ID_CHARS]
        path = self.root / entry_id
        lock_fd = self._open_lock(entry_id)
        try:
            fetched = self._hold(url, path, lock_fd, fetch)
            os.utime(path)  # least recently used goes first
            if fetched:
                self._evict(keep=entry_id)
        except BaseException:
            os.close(lock_fd)
            raise
        return CachedTree(path, lock_fd)

    def _open_lock(self, entry_id: str) -> int:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return os.open(locks / entry_id, os.O_RDWR | os.O_CREAT, 0o644)

    def _hold(self, url: str, path: Path, lock_fd: int, fetch: Fetch) -> bool:
        """Hold `lock_fd` shared over a complete entry at `path`, fetching it if missing;
        whether this call fetched it. Changing a flock's mode is not atomic, so an evictor may
        remove the entry between the exclusive and the shared lock: then go round again."""
        fetched = False
        while True:
            fcntl.flock(lock_fd, fcntl.LOCK_SH)
            if path.is_dir():
                return fetched
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if not path.is_dir():
                self._fetch(url, path, fetch)
                fetched = True

    def _fetch(self, url: str, path: Path, fetch: Fetch) -> None:
        """Fetch into a staging directory on the cache's filesystem, then rename it into
        place: an entry is complete or absent."""
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            fetch(url, staging)
            os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _evict(self, keep: str) -> None:
        """Remove least recently used entries nobody holds until the cache fits (entries in
        use may keep it over), and staging directories abandoned by a crashed fetch."""
        entries = sorted(self._entries(), key=lambda entry: entry[0])
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            if path.name != keep and self._remove_unheld(path):
                total -= size
        self._remove_stale_staging()

    def _entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of each entry; one removed meanwhile is left out."""
        entries = []
        for path in self.root.iterdir():
            if not ENTRY_NAME.fullmatch(path.name):
                continue
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                size = sum(file.stat().st_size for file in path.iterdir())
                entries.append((path.stat().st_mtime, size, path))
        return entries

    def _remove_unheld(self, path: Path) -> bool:
        """Remove the entry at `path` unless someone holds it. It is renamed away first, so a
        crash midway leaves a staging directory, never a partial entry."""
        lock_fd = self._open_lock(path.name)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return False
        try:
            trash = self.root / f"{STAGING_PREFIX}evicted-{path.name}-{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):  # another evictor was first
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
        finally:
            os.close(lock_fd)
        return True

    def _remove_stale_staging(self) -> None:
        """Staging directories untouched for an hour: their fetch died. A live fetch keeps
        writing, which updates its files' times."""
        cutoff = time.time() - STALE_STAGING_S
        for staging in self.root.glob(f"{STAGING_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                times = [item.stat().st_mtime for item in (staging, *staging.iterdir())]
                if max(times) < cutoff:
                    shutil.rmtree(staging, ignore_errors=True)


def cache_from_env() -> TreeCache:
    """The cache the vLLM plugin uses: `$DORA_GATEWAY_CACHE_DIR` (default
    `$DORA_GATEWAY_HOME/cache`), bounded by `$DORA_GATEWAY_CACHE_MAX_BYTES` (default 10 GiB)."""
    directory = os.environ.get(CACHE_DIR_ENV)
    raw_max = os.environ.get(CACHE_MAX_BYTES_ENV, str(DEFAULT_MAX_BYTES))
    try:
        max_bytes = int(raw_max)
    except ValueError:
        raise ValueError(f"{CACHE_MAX_BYTES_ENV} must be a number of bytes, not {raw_max!r}"
                         ) from None
    return TreeCache(Path(directory) if directory else paths.home() / "cache", max_bytes)
