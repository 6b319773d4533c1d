"""A content-addressed store of compiled adapters.

The key is (adapter content hash, base fingerprint, format version): the same adapter on the
same base compiles once, a changed file or base gets a new entry, and an entry is never
rewritten. Entries appear atomically (written to a temporary directory, then renamed), so a
crash or a concurrent compile never leaves a half-written artifact behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adapters.base_checkpoint import BaseCheckpoint
from adapters.compile import adapter_content_hash, compile_adapter
from adapters.compiled import FORMAT_VERSION, METADATA_FILE, write_compiled
from adapters.peft_adapter import read_adapter


@dataclass(frozen=True)
class StoreEntry:
    """A compiled artifact; `is_dora` comes from the adapter just read, so callers need not
    open the artifact's metadata."""

    path: Path
    adapter_hash: str
    is_dora: bool
    cache_hit: bool


class CompiledStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry_path(self, adapter_hash: str, base_fingerprint: str) -> Path:
        return self.root / f"{adapter_hash[:32]}-{base_fingerprint[:32]}-v{FORMAT_VERSION}"

    def compile(self, adapter_dir: str | Path, base: BaseCheckpoint) -> StoreEntry:
        """The compiled artifact for `adapter_dir` on `base`, compiling it on a miss."""
        adapter = read_adapter(adapter_dir)
        adapter_hash = adapter_content_hash(adapter_dir)
        base_fingerprint = base.fingerprint()
        path = self.entry_path(adapter_hash, base_fingerprint)
        if (path / METADATA_FILE).is_file():
            return StoreEntry(path, adapter_hash, adapter.is_dora, cache_hit=True)
        compiled = compile_adapter(adapter, base, adapter_hash, base_fingerprint)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        try:
            write_compiled(compiled, staging)
            _publish(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return StoreEntry(path, adapter_hash, adapter.is_dora, cache_hit=False)


def _publish(staging: Path, path: Path) -> None:
    """Rename the finished entry into place; a concurrent writer that won keeps its copy."""
    try:
        os.rename(staging, path)
    except OSError:
        if not (path / METADATA_FILE).is_file():
            raise
