"""Where compiled artifacts and kept adapter files live for every gateway and backend.

Two stores behind one interface, chosen by `[store] url`:
- `LocalArtifacts` (the default): directories under `$DORA_GATEWAY_HOME` that the gateways and
  vLLM share (one host, or a volume they all mount); vLLM loads the artifact's path.
- `S3Artifacts`: an S3-compatible bucket; the gateway compiles into its own local store, then
  publishes the artifact as a tree (`adapters.object_store`), and vLLM is given the tree's
  `s3://` URL, which the plugin fetches into the replica's own cache. No directory is shared.

An adapter that is not under a local root (an upload, an `s3://` or `hf://` source) is *kept*
in the store by content hash, so any gateway can compile it again (a new base model, a lost
artifact) from the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from adapters.compile import adapter_content_hash
from adapters.compiled import METADATA_FILE
from adapters.object_store import S3Trees
from adapters.peft_adapter import CONFIG_FILE, WEIGHTS_FILE
from adapters.store import CompiledStore
from adapters.tree_cache import TreeCache

COMPILED = "compiled"
KEPT_ADAPTERS = "adapters"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class ArtifactStore(Protocol):
    compiled: CompiledStore

    def publish(self, artifact: Path) -> str:
        """Make the compiled `artifact` (a directory of `compiled`) loadable by every
        backend; what vLLM's `lora_path` should be."""

    def location(self, artifact_name: str) -> str | None:
        """The `lora_path` of an artifact published before, or None."""

    def keep(self, directory: Path) -> str:
        """Keep the adapter in `directory` by content hash; a reference for `open_kept`."""

    def open_kept(self, reference: str) -> contextlib.AbstractContextManager[Path]:
        """A local directory holding the adapter `reference` (from `keep`, or a path)."""


class LocalArtifacts:
    """`compiled/` and `uploads/` directories that every gateway and backend mounts."""

    def __init__(self, compiled: CompiledStore, uploads: Path) -> None:
        self.compiled = compiled
        self.uploads = uploads

    def publish(self, artifact: Path) -> str:
        return str(artifact)

    def location(self, artifact_name: str) -> str | None:
        path = self.compiled.root / artifact_name
        return str(path) if (path / METADATA_FILE).is_file() else None

    def keep(self, directory: Path) -> str:
        """An upload is already kept; other files are copied in, atomically."""
        target = self.uploads / adapter_content_hash(directory)
        if directory.resolve() == target.resolve() or (target / CONFIG_FILE).is_file():
            return str(target)
        self.uploads.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".keep-", dir=self.uploads))
        try:
            for name in ADAPTER_FILES:
                shutil.copyfile(directory / name, staging / name)
            os.chmod(staging, 0o755)
            with contextlib.suppress(OSError):  # a concurrent keeper that won has the same
                os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return str(target)

    @contextlib.contextmanager
    def open_kept(self, reference: str) -> Iterator[Path]:
        yield Path(reference)


class S3Artifacts:
    """A bucket every gateway and backend reaches; `compiled` is this gateway's own local
    store (where it compiles), `cache` where it fetches kept adapters to compile them."""

    def __init__(self, url: str, compiled: CompiledStore, cache: TreeCache) -> None:
        self.url = url
        self.compiled = compiled
        self._trees = S3Trees(url)
        self._cache = cache

    def check(self) -> None:
        """`SourceError` unless the bucket is there and these credentials reach it."""
        self._trees.check()

    def publish(self, artifact: Path) -> str:
        return self._trees.publish(f"{COMPILED}/{artifact.name}", artifact)

    def location(self, artifact_name: str) -> str | None:
        key = f"{COMPILED}/{artifact_name}"
        return self._trees.tree_url(key) if self._trees.exists(key) else None

    def keep(self, directory: Path) -> str:
        """Only the two PEFT files are published (an upload's directory holds nothing
        else, a Hub snapshot may)."""
        with tempfile.TemporaryDirectory(prefix="dora-keep-") as staging:
            for name in ADAPTER_FILES:
                os.symlink((directory / name).resolve(), Path(staging) / name)
            key = f"{KEPT_ADAPTERS}/{adapter_content_hash(directory)}"
            return self._trees.publish(key, Path(staging))

    @contextlib.contextmanager
    def open_kept(self, reference: str) -> Iterator[Path]:
        """A kept adapter is fetched into the cache (and held there while compiling); a
        local path (an adapter under a root) is used in place."""
        if not reference.startswith("s3://"):
            yield Path(reference)
            return
        with self._cache.open(reference) as cached:
            yield cached.path
