"""Adapters added by URL: `s3://bucket/path/` (any S3-compatible store) and
`hf://org/repo[@revision][/subfolder]` (the Hugging Face Hub).

A source is fetched once, when it is added; the registry then keeps the files in its own
store by content hash (`artifacts.py`), so a restart, or another gateway, serves the same bytes
even if the bucket or the repository changes. What the URL resolved to (each object's ETag and
version, the Hub commit) is recorded beside it. Everything that goes wrong is a `SourceError`
naming the URL.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import SourceError
from adapters.hub import HubSource, fetch_adapter
from adapters.object_store import S3Url, read_object
from adapters.peft_adapter import CONFIG_FILE, WEIGHTS_FILE

SCHEMES = ("s3://", "hf://")


@dataclass(frozen=True)
class FetchedAdapter:
    """`directory` holds the two PEFT files; `description` is JSON: the URL as given and
    what it resolved to."""

    directory: Path
    description: str


@contextlib.contextmanager
def fetched(url: str, max_bytes: int) -> Iterator[FetchedAdapter]:
    """The adapter at `url`, in a local directory for as long as the block runs.
    `max_bytes` bounds its files together."""
    if url.startswith("s3://"):
        with _fetched_s3(url, max_bytes) as adapter:
            yield adapter
    elif url.startswith("hf://"):
        with _fetched_hub(url, max_bytes) as adapter:
            yield adapter
    else:
        raise SourceError("invalid", url, "a source must be s3://bucket/path/ or "
                                          "hf://org/repo[@revision][/subfolder]")


@contextlib.contextmanager
def _fetched_hub(url: str, max_bytes: int) -> Iterator[FetchedAdapter]:
    """The adapter's files copied out of the Hub cache, whose snapshot files are links into
    its blob store (the adapter reader refuses files that link out of their directory)."""
    hub = fetch_adapter(HubSource.parse(url), max_bytes)
    with tempfile.TemporaryDirectory(prefix="dora-source-") as staging:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(hub.directory / name, Path(staging) / name)
        yield FetchedAdapter(Path(staging), json.dumps({"url": url, "commit": hub.commit}))


@contextlib.contextmanager
def _fetched_s3(url: str, max_bytes: int) -> Iterator[FetchedAdapter]:
    """Both files of the PEFT directory at `url`, each object's ETag and version noted."""
    directory = S3Url.parse(url)
    resolved = {}
    with tempfile.TemporaryDirectory(prefix="dora-source-") as staging:
        left = max_bytes
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            fetched_object = read_object(str(directory.join(name)), left)
            left -= len(fetched_object.data)
            (Path(staging) / name).write_bytes(fetched_object.data)
            resolved[name] = {"etag": fetched_object.etag,
                              "version_id": fetched_object.version_id}
        yield FetchedAdapter(Path(staging), json.dumps({"url": url, "objects": resolved}))
