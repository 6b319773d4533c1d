"""A Hugging Face Hub cache written by hand, for tests that cannot reach the Hub.

`cache_repo` leaves a model repo as an online `snapshot_download` (huggingface_hub 2.x) leaves
it, and as the library reads it offline or with `local_files_only`:

    <cache>/models--org--repo/
      refs/<branch or tag>          the commit it points to (no newline; read verbatim)
      blobs/<etag>                  file contents: sha256 for an LFS file, git blob sha1 else
      snapshots/<commit>/<path>     relative symlinks into blobs/, the folder returned
      trees/<commit>.json           the commit's file listing; it tells a complete snapshot
                                    from an interrupted one, and a file the repo lacks from
                                    one never downloaded

The layout is written from the format, not with the library's helpers, so a change in what
the library reads fails the tests instead of following along. Not written, because the offline
paths do not read them: `.locks/`, `.no_exist/` (files `hf_hub_download` found missing) and
xet hashes in the listing.

What stays untested without the network: downloading at all, resolving a branch or tag on the
Hub (and writing its ref), the sizes the Hub lists before a download, HF_TOKEN with private and
gated repos, ETag revalidation of a cached branch that moved, xet transfers, and every error
only the Hub or the connection gives (404, 401/403, 5xx, timeouts): `adapters.hub` maps those
from exceptions the tests construct.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterable
from pathlib import Path

import pytest
from huggingface_hub import constants

# Stored with git LFS, as the Hub's default .gitattributes does for weights.
LFS_SUFFIXES = (".safetensors", ".bin")
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path], commit: str, *,
               refs: Iterable[str] = ("main",), listing: bool = True,
               not_downloaded: Collection[str] = ()) -> Path:
    """Write commit `commit` of model repo `repo_id` (`files`: path in repo -> source file),
    with each of `refs` pointing at it; return its snapshot folder.

    `listing=False` leaves out trees/<commit>.json, like a cache written by an older library or
    by `hf_hub_download` alone; `not_downloaded` names files of the listing whose download never
    finished (no blob, no symlink).
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    tree = {}
    for path_in_repo, source in files.items():
        data = source.read_bytes()
        tree[path_in_repo], etag = _tree_entry(path_in_repo, data)
        if path_in_repo not in not_downloaded:
            _write_file(repo / "blobs" / etag, snapshot / path_in_repo, data)
    if listing:
        _write(repo / "trees" / f"{commit}.json",
               json.dumps({"format_version": 1, "files": tree}, indent=1).encode())
    for ref in refs:
        _write(repo / "refs" / ref, commit.encode())
    return snapshot


def _tree_entry(path_in_repo: str, data: bytes) -> tuple[dict, str]:
    """The listing entry the Hub's tree API gives for `data`, and the ETag its blob is named
    by (git's blob id for a plain file; the content's sha256 for an LFS one)."""
    if not path_in_repo.endswith(LFS_SUFFIXES):
        blob_id = _git_blob_id(data)
        return {"size": len(data), "blob_id": blob_id}, blob_id
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = LFS_POINTER.format(sha256=sha256, size=len(data)).encode()
    entry = {"size": len(data), "blob_id": _git_blob_id(pointer), "lfs_sha256": sha256,
             "lfs_size": len(data)}
    return entry, sha256


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _write_file(blob: Path, link: Path, data: bytes) -> None:
    _write(blob, data)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, offline. huggingface_hub reads the environment once, at import, so
    the constants it read are patched too (`test_environment_alone_is_honoured` checks the
    environment by itself, in a fresh interpreter)."""
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
