"""Directories ("trees") of files on S3-compatible object storage, and plain objects read from
a user's bucket.

Layout under a store root `s3://bucket/prefix/`:
- `blobs/<sha256>`: a file's bytes, keyed by their hash, so identical files (the same adapter
  kept twice, an artifact published again) are stored once;
- `<kind>/<name>/manifest.json`: `{"format": 1, "files": {name: {"sha256", "size"}}}`.

A tree exists exactly when its manifest does, and the manifest is written last, after every
blob it names. An S3 PUT (multipart included) is atomic, so a writer killed midway leaves at
most complete orphan blobs, never a manifest: nothing half-written is ever under a tree's key.
Readers verify every blob's hash and size, so a damaged store is reported, never served.

Endpoint, region and credentials come only from boto3's own environment and config chain
(`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `~/.aws/config`...); they need s3:GetObject,
s3:PutObject and s3:ListBucket (without it, S3 answers a missing object with 403, not 404).
Every failure is a `SourceError` naming the object's URL; no botocore exception escapes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    FlexibleChecksumError,
    NoCredentialsError,
    PartialCredentialsError,
)

from adapters.errors import SourceError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
MANIFEST_MAX_BYTES = 1024 * 1024
BLOBS = "blobs"
CHUNK_BYTES = 1024 * 1024

# Bounded, so a dead or hung store fails a request in seconds, not minutes. Path-style
# addressing is left to the standard config (`s3 = addressing_style = path`).
CLIENT_CONFIG = Config(connect_timeout=10, read_timeout=60,
                       retries={"total_max_attempts": 3, "mode": "standard"})

NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
DENIED_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
NO_CREDENTIALS = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class S3Url:
    """`s3://bucket/key`; `key` has no leading or trailing slash (empty: the bucket's root)."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> S3Url:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        key = key.strip("/")
        segments = key.split("/") if key else []
        if (not url.startswith("s3://") or not BUCKET_NAME.fullmatch(bucket)
                or any(segment in ("", ".", "..") for segment in segments)):
            raise SourceError("invalid", url, "not an object storage URL: expected "
                                              "s3://bucket/path")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def join(self, *parts: str) -> S3Url:
        key = "/".join(part.strip("/") for part in (self.key, *parts) if part.strip("/"))
        return S3Url(self.bucket, key)


@dataclass(frozen=True)
class FetchedObject:
    """A plain object's bytes and what they were (`etag` as the store sent it, quoted;
    `version_id` None on an unversioned bucket), so a caller can record what it read."""

    data: bytes
    etag: str
    version_id: str | None


class S3Trees:
    """Trees under one store root, e.g. `s3://bucket/prefix`."""

    def __init__(self, url: str) -> None:
        self.root = S3Url.parse(url)

    def tree_url(self, key: str) -> str:
        """Where the tree `key` ("<kind>/<name>") lives: what `fetch_tree` takes."""
        return str(self.root.join(_tree_key(self.root, key)))

    def publish(self, key: str, directory: Path) -> str:
        """Upload the regular files of `directory` (not its subdirectories) as the tree `key`;
        blobs first, the manifest last. Publishing the same files again uploads nothing
        new."""
        tree = self.root.join(_tree_key(self.root, key))
        files = {}
        for path in sorted(directory.iterdir()):
            if path.is_file():
                files[path.name] = _upload_blob(self.root, path)
        manifest = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1)
        _put_bytes(tree.join(MANIFEST), manifest.encode(), "application/json")
        return str(tree)

    def check(self) -> None:
        """Ask for the bucket itself: a missing bucket, refused credentials or a dead endpoint
        fail here, before anything is published (a missing object would not tell a missing
        bucket apart)."""
        bucket = S3Url(self.root.bucket, "")
        with _store_errors(bucket):
            _client().head_bucket(Bucket=bucket.bucket)

    def exists(self, key: str) -> bool:
        """Whether the tree `key` was published (its manifest is there)."""
        try:
            _head(self.root.join(_tree_key(self.root, key), MANIFEST))
        except SourceError as error:
            if error.kind == "not_found":
                return False
            raise
        return True


def fetch_tree(tree_url: str, destination: Path) -> None:
    """Download the tree at `tree_url` into the empty directory `destination`, verifying each
    file's hash and size as it streams; on any failure nothing is left in `destination`.

    Blobs live under the store root: the tree's URL less its "<kind>/<name>".
    """
    tree = S3Url.parse(tree_url)
    segments = tree.key.split("/")
    if len(segments) < 2:
        raise SourceError("invalid", tree_url, "not a tree URL: expected s3://bucket/"
                                               "[prefix/]<kind>/<name>")
    root = S3Url(tree.bucket, "/".join(segments[:-2]))
    files = _read_manifest(tree.join(MANIFEST))
    try:
        for name, (sha256, size) in files.items():
            _download_blob(root.join(BLOBS, sha256), sha256, size, destination / name)
    except BaseException:
        for name in files:
            (destination / name).unlink(missing_ok=True)
        raise


def read_object(url: str, max_bytes: int) -> FetchedObject:
    """The object at `url`, refused as "too_large" above `max_bytes` before any byte of it is
    downloaded (and while reading, should it have grown since)."""
    where = S3Url.parse(url)
    size = _head(where)["ContentLength"]
    if size > max_bytes:
        raise _too_large(where, size, max_bytes)
    response = _get(where)
    data = _read_limited(response["Body"], max_bytes + 1, where)
    if len(data) > max_bytes:
        raise _too_large(where, len(data), max_bytes)
    return FetchedObject(data, response["ETag"], response.get("VersionId"))


def _tree_key(root: S3Url, key: str) -> str:
    """`key` checked to be "<kind>/<name>", the shape `fetch_tree` relies on."""
    segments = key.split("/")
    if len(segments) != 2 or not all(_is_plain(segment) for segment in segments):
        raise SourceError("invalid", str(root.join(key)),
                          "a tree key must be <kind>/<name>, each a plain name")
    return key


def _is_plain(name: str) -> bool:
    """One path segment that cannot climb out of its directory."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _upload_blob(root: S3Url, path: Path) -> dict[str, Any]:
    """Store `path`'s bytes under their hash unless a blob of that size is already there."""
    sha256, size = _file_digest(path)
    blob = root.join(BLOBS, sha256)
    try:
        present = _head(blob)["ContentLength"] == size
    except SourceError as error:
        if error.kind != "not_found":
            raise
        present = False
    if not present:
        with path.open("rb") as file, _store_errors(blob):
            _client().upload_fileobj(file, blob.bucket, blob.key)
    return {"sha256": sha256, "size": size}


def _file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _read_manifest(where: S3Url) -> dict[str, tuple[str, int]]:
    """The manifest's files as name -> (sha256, size); anything malformed is "corrupt"."""
    raw = _read_limited(_get(where)["Body"], MANIFEST_MAX_BYTES + 1, where)
    try:
        if len(raw) > MANIFEST_MAX_BYTES:
            raise ValueError(f"larger than {MANIFEST_MAX_BYTES} bytes")
        return _manifest_files(json.loads(raw))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise SourceError("corrupt", str(where), f"not a valid tree manifest ({error!r})"
                          ) from error


def _manifest_files(manifest: Any) -> dict[str, tuple[str, int]]:
    if manifest["format"] != MANIFEST_FORMAT:
        raise ValueError(f"format {manifest['format']!r}, expected {MANIFEST_FORMAT}")
    files = {}
    for name, entry in manifest["files"].items():
        sha256, size = entry["sha256"], entry["size"]
        if (not _is_plain(name) or not SHA256_HEX.fullmatch(sha256) or type(size) is not int
                or size < 0):
            raise ValueError(f"bad entry for {name!r}")
        files[name] = (sha256, size)
    return files


def _download_blob(blob: S3Url, sha256: str, size: int, target: Path) -> None:
    """Stream `blob` into `target`, refusing it the moment it is longer than `size`, or at
    its end when its hash or size differs from what the manifest says."""
    digest, written = hashlib.sha256(), 0
    with target.open("xb") as file:
        for chunk in _chunks(_get(blob)["Body"], blob):
            written += len(chunk)
            if written > size:
                break
            digest.update(chunk)
            file.write(chunk)
    if written != size or digest.hexdigest() != sha256:
        raise SourceError("corrupt", str(blob), f"the blob does not match its manifest entry "
                                                f"(expected {size} bytes with sha256 {sha256})")


def _read_limited(body: Any, limit: int, where: S3Url) -> bytes:
    """At most `limit` bytes of a response body (the rest is not downloaded)."""
    data = bytearray()
    for chunk in _chunks(body, where):
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data[:limit])


def _chunks(body: Any, where: S3Url) -> Iterator[bytes]:
    """A response body's chunks; the connection is closed however the reading ends."""
    try:
        with _store_errors(where):
            while chunk := body.read(CHUNK_BYTES):
                yield chunk
    finally:
        body.close()


def _head(where: S3Url) -> dict[str, Any]:
    with _store_errors(where):
        return _client().head_object(Bucket=where.bucket, Key=where.key)


def _get(where: S3Url) -> dict[str, Any]:
    with _store_errors(where):
        return _client().get_object(Bucket=where.bucket, Key=where.key)


def _put_bytes(where: S3Url, data: bytes, content_type: str) -> None:
    with _store_errors(where):
        _client().put_object(Bucket=where.bucket, Key=where.key, Body=data,
                             ContentType=content_type)


def _too_large(where: S3Url, size: int, max_bytes: int) -> SourceError:
    return SourceError("too_large", str(where), f"the object is {size} bytes, more than the "
                                                f"{max_bytes} allowed")


@contextlib.contextmanager
def _store_errors(where: S3Url) -> Iterator[None]:
    """Turns any botocore failure inside the block into a `SourceError` about `where`."""
    try:
        yield
    except (ClientError, BotoCoreError) as error:
        raise _source_error(error, str(where)) from error


def _source_error(error: ClientError | BotoCoreError, where: str) -> SourceError:
    if isinstance(error, NO_CREDENTIALS):
        return SourceError("denied", where, f"no usable credentials for the store ({error})")
    if isinstance(error, FlexibleChecksumError):
        return SourceError("corrupt", where, f"the object failed its checksum ({error})")
    if not isinstance(error, ClientError):
        return SourceError("unavailable", where, f"the store could not be reached "
                                                 f"({type(error).__name__}: {error})")
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in NOT_FOUND_CODES or status == 404:
        return SourceError("not_found", where, f"no such object or bucket ({code})")
    if code in DENIED_CODES or status == 403:
        return SourceError("denied", where, f"access denied ({code}): check the store's "
                                            f"credentials")
    if 400 <= status < 500:
        return SourceError("invalid", where, f"the store refused the request ({code}, "
                                             f"HTTP {status})")
    return SourceError("unavailable", where, f"the store failed the request ({code}, "
                                             f"HTTP {status})")


def _client() -> Any:
    """This process's client for the current AWS_* environment (a test or a caller may
    change it; a forked child must not share its parent's connections)."""
    environment = tuple(sorted((name, value) for name, value in os.environ.items()
                               if name.startswith("AWS_")))
    return _client_for(os.getpid(), environment)


@functools.lru_cache(maxsize=4)
def _client_for(pid: int, environment: tuple[tuple[str, str], ...]) -> Any:
    """A fresh session per client: clients are thread-safe, sessions are not."""
    return boto3.session.Session().client("s3", config=CLIENT_CONFIG)
