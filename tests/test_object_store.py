"""Trees on object storage (`adapters.object_store`) against a real S3-compatible server
(moto, in a subprocess), and the local cache of fetched trees (`adapters.tree_cache`) shared by
threads and processes.

The code under test reaches the server only through the AWS_* environment (the `s3_env`
fixture); its clients are cached per environment, so a test that changes it needs no reset.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters import paths
from adapters.errors import SourceError
from adapters.object_store import S3Trees, S3Url, fetch_tree, read_object
from adapters.tree_cache import (
    CACHE_DIR_ENV,
    CACHE_MAX_BYTES_ENV,
    DEFAULT_MAX_BYTES,
    TreeCache,
    cache_from_env,
)
from tests.s3_server import S3Server, new_bucket_name, use_server_env

REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 60
FILES = {"adapter_config.json": b'{"r": 4}', "empty.txt": b"",
         "weights.bin": os.urandom(3 * 1024 * 1024 + 17)}

# Opens `url` in a cache from another process, its fetch held at a gate until the test opens
# it; prints the sha256 of each file it then reads.
OPEN_SCRIPT = """
import hashlib, json, os, sys, time
from pathlib import Path
from adapters.object_store import fetch_tree
from adapters.tree_cache import TreeCache

root, url, calls, gate = sys.argv[1:]

def gated_fetch(url, destination):
    (Path(calls) / str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while not Path(gate).exists():
        assert time.monotonic() < deadline, "the gate never opened"
        time.sleep(0.05)
    fetch_tree(url, destination)

with TreeCache(Path(root), 10**9).open(url, gated_fetch) as tree:
    print(json.dumps({f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                      for f in tree.path.iterdir()}))
"""

# Holds the cached tree `url` from another process until its stdin closes.
HOLD_SCRIPT = """
import sys
from pathlib import Path
from adapters.tree_cache import TreeCache

def no_fetch(url, destination):
    raise AssertionError("the entry should be in the cache already")

root, url = sys.argv[1:]
with TreeCache(Path(root), 10**9).open(url, no_fetch):
    print("held", flush=True)
    sys.stdin.readline()
"""


def write_files(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def read_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_keys(server: S3Server, bucket: str, prefix: str) -> set[str]:
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/blobs/")
    return {item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", [])}


def source_error(call: Callable[[], object]) -> SourceError:
    with pytest.raises(SourceError) as raised:
        call()
    return raised.value


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lock_waiters(lock_file: Path) -> int:
    """Processes or threads blocked on a flock of `lock_file` (Linux's /proc/locks marks
    them "->")."""
    inode = f":{lock_file.stat().st_ino}"
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if "->" in line and any(field.endswith(inode) for field in line.split()))


def lock_file(cache_root: Path, url: str) -> Path:
    return cache_root / ".locks" / sha256(url.encode())[:40]


@pytest.fixture
def bucket(s3_env: S3Server) -> str:
    return s3_env.create_bucket(new_bucket_name())


@pytest.fixture
def trees(bucket: str) -> S3Trees:
    return S3Trees(f"s3://{bucket}/store/v1/")


@pytest.fixture
def tree_url(trees: S3Trees, tmp_path: Path) -> str:
    return trees.publish("compiled/demo", write_files(tmp_path / "source", FILES))


class FakeFetch:
    """A fetch without a store: one file of `size` bytes; its calls are counted."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.calls: list[str] = []

    def __call__(self, url: str, destination: Path) -> None:
        self.calls.append(url)
        (destination / "data").write_bytes(b"x" * self.size)


# --- S3 URLs -------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "bucket", "key", "joined"), [
    ("s3://bucket", "bucket", "", "s3://bucket/d/e"),
    ("s3://bucket/", "bucket", "", "s3://bucket/d/e"),
    ("s3://bucket/a/b/c//", "bucket", "a/b/c", "s3://bucket/a/b/c/d/e"),
    ("s3://my.bucket-1/x", "my.bucket-1", "x", "s3://my.bucket-1/x/d/e")])
def test_url_parses(url: str, bucket: str, key: str, joined: str) -> None:
    parsed = S3Url.parse(url)
    assert (parsed.bucket, parsed.key) == (bucket, key)
    assert S3Url.parse(str(parsed)) == parsed
    assert str(parsed.join("d/", "e")) == joined


@pytest.mark.parametrize("url", ["bucket/key", "s3://", "s3:///key", "s3://bu/../x",
                                 "s3://bucket/a//b", "s3://bucket/./a", "https://bucket/a"])
def test_url_malformed_is_invalid(url: str) -> None:
    error = source_error(lambda: S3Url.parse(url))
    assert (error.kind, error.where) == ("invalid", url)


@pytest.mark.parametrize("key", ["demo", "compiled/a/b", "compiled/..", "/compiled", "a/"])
def test_tree_key_must_be_kind_and_name(trees: S3Trees, key: str, tmp_path: Path) -> None:
    assert source_error(lambda: trees.tree_url(key)).kind == "invalid"
    assert source_error(lambda: trees.publish(key, tmp_path)).kind == "invalid"


# --- trees -------------------------------------------------------------------------------

def test_publish_then_fetch_gives_the_same_files(s3_env: S3Server, bucket: str, trees: S3Trees,
                                                 tmp_path: Path) -> None:
    source = write_files(tmp_path / "source", FILES)
    (source / "subdirectory").mkdir()
    url = trees.publish("compiled/demo", source)
    assert url == trees.tree_url("compiled/demo") == f"s3://{bucket}/store/v1/compiled/demo"
    assert trees.exists("compiled/demo")

    (tmp_path / "fetched").mkdir()
    fetch_tree(url, tmp_path / "fetched")
    assert read_files(tmp_path / "fetched") == FILES
    manifest = json.loads(s3_env.client().get_object(
        Bucket=bucket, Key="store/v1/compiled/demo/manifest.json")["Body"].read())
    assert manifest == {"format": 1, "files": {
        name: {"sha256": sha256(data), "size": len(data)} for name, data in FILES.items()}}


def test_symlinked_files_are_published_as_their_content(trees: S3Trees, tmp_path: Path) -> None:
    """How the registry keeps an adapter: a directory of links to the two files."""
    source = write_files(tmp_path / "source", {"weights.bin": b"w" * 10})
    for directory in ("links", "fetched"):
        (tmp_path / directory).mkdir()
    (tmp_path / "links" / "weights.bin").symlink_to(source / "weights.bin")
    fetch_tree(trees.publish("adapters/linked", tmp_path / "links"), tmp_path / "fetched")
    assert read_files(tmp_path / "fetched") == {"weights.bin": b"w" * 10}


def test_identical_files_are_stored_once(s3_env: S3Server, bucket: str, trees: S3Trees,
                                         tmp_path: Path) -> None:
    same, other, third = b"same bytes", b"other bytes", b"third"
    trees.publish("adapters/one", write_files(tmp_path / "one",
                                              {"a": same, "b": same, "c": other}))
    trees.publish("adapters/two", write_files(tmp_path / "two", {"d": same, "e": third}))
    trees.publish("adapters/one", tmp_path / "one")
    assert blob_keys(s3_env, bucket, "store/v1") == {sha256(same), sha256(other), sha256(third)}


def test_a_blob_of_the_right_size_is_not_uploaded_again(s3_env: S3Server, bucket: str,
                                                        trees: S3Trees, tmp_path: Path) -> None:
    """Shown by overwriting blobs on the server: one the same size stays as it is, one of
    another size is replaced by the real bytes."""
    kept, replaced = b"kept " * 4, b"replaced " * 4
    source = write_files(tmp_path / "source", {"kept": kept, "replaced": replaced})
    trees.publish("adapters/x", source)
    s3 = s3_env.client()
    s3.put_object(Bucket=bucket, Key=f"store/v1/blobs/{sha256(kept)}", Body=b"K" * len(kept))
    s3.put_object(Bucket=bucket, Key=f"store/v1/blobs/{sha256(replaced)}", Body=b"short")
    trees.publish("adapters/x", source)

    def blob(data: bytes) -> bytes:
        return s3.get_object(Bucket=bucket, Key=f"store/v1/blobs/{sha256(data)}")["Body"].read()

    assert (blob(kept), blob(replaced)) == (b"K" * len(kept), replaced)


def test_a_tree_without_manifest_does_not_exist(trees: S3Trees, tmp_path: Path) -> None:
    assert not trees.exists("compiled/missing")
    url = trees.tree_url("compiled/missing")
    error = source_error(lambda: fetch_tree(url, tmp_path))
    assert (error.kind, error.where) == ("not_found", f"{url}/manifest.json")
    assert url in str(error)


def test_a_missing_bucket_is_not_found(s3_env: S3Server, tmp_path: Path) -> None:
    url = f"s3://{new_bucket_name()}/store/compiled/x"
    assert source_error(lambda: fetch_tree(url, tmp_path)).kind == "not_found"


@pytest.mark.parametrize("damage", [b"X", b"XX", b""], ids=["same-size", "longer", "shorter"])
def test_a_damaged_blob_is_corrupt_and_leaves_nothing(s3_env: S3Server, bucket: str,
                                                      tree_url: str, damage: bytes,
                                                      tmp_path: Path) -> None:
    """weights.bin is fetched after adapter_config.json and empty.txt: those are removed."""
    weights = FILES["weights.bin"]
    key = f"store/v1/blobs/{sha256(weights)}"
    s3_env.client().put_object(Bucket=bucket, Key=key, Body=weights[:-1] + damage)
    destination = tmp_path / "destination"
    destination.mkdir()

    error = source_error(lambda: fetch_tree(tree_url, destination))
    assert (error.kind, error.where) == ("corrupt", f"s3://{bucket}/{key}")
    assert list(destination.iterdir()) == []

    cache = TreeCache(tmp_path / "cache", 10**9)
    assert source_error(lambda: cache.open(tree_url)).kind == "corrupt"
    assert [path.name for path in cache.root.iterdir()] == [".locks"]


@pytest.mark.parametrize("manifest", [
    b"not json", b"[]", b'{"format": 2, "files": {}}', b'{"format": 1, "files": []}',
    json.dumps({"format": 1, "files": {"../escape": {"sha256": "a" * 64, "size": 1}}}).encode(),
    json.dumps({"format": 1, "files": {"x": {"sha256": "not a hash", "size": 1}}}).encode(),
    json.dumps({"format": 1, "files": {"x": {"sha256": "a" * 64, "size": -1}}}).encode(),
    b" " * (1024 * 1024 + 1)])
def test_a_malformed_manifest_is_corrupt(s3_env: S3Server, bucket: str, trees: S3Trees,
                                         manifest: bytes, tmp_path: Path) -> None:
    key = "store/v1/compiled/bad/manifest.json"
    s3_env.client().put_object(Bucket=bucket, Key=key, Body=manifest)
    error = source_error(lambda: fetch_tree(trees.tree_url("compiled/bad"), tmp_path))
    assert (error.kind, error.where) == ("corrupt", f"s3://{bucket}/{key}")
    assert list(tmp_path.iterdir()) == []


def test_a_stopped_store_is_unavailable(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    """A server of its own, stopped after publishing: connections are refused."""
    server = S3Server()
    server.start()
    try:
        use_server_env(server.env(), monkeypatch)
        trees = S3Trees(f"s3://{server.create_bucket(new_bucket_name())}/store")
        url = trees.publish("compiled/x", write_files(tmp_path / "source", {"a": b"a"}))
    finally:
        server.stop()
    error = source_error(lambda: fetch_tree(url, tmp_path))
    assert (error.kind, error.where) == ("unavailable", f"{url}/manifest.json")
    assert source_error(lambda: trees.exists("compiled/x")).kind == "unavailable"


def test_unknown_credentials_are_denied(s3_env: S3Server, tree_url: str,
                                        tmp_path: Path) -> None:
    """The server checks signatures for real: "testing" is no key it issued."""
    with s3_env.enforcing_auth():
        error = source_error(lambda: fetch_tree(tree_url, tmp_path))
    assert (error.kind, error.where) == ("denied", f"{tree_url}/manifest.json")
    assert "InvalidAccessKeyId" in error.detail


def test_credentials_without_permission_are_denied(s3_env: S3Server, bucket: str,
                                                   tree_url: str, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    """A user the server knows, whose IAM policy allows nothing: AccessDenied (403)."""
    s3_env.client().put_object(Bucket=bucket, Key="user/config.json", Body=b"{}")
    use_server_env(s3_env.create_user([]), monkeypatch)
    with s3_env.enforcing_auth():
        fetch_error = source_error(lambda: fetch_tree(tree_url, tmp_path))
        read_error = source_error(lambda: read_object(f"s3://{bucket}/user/config.json", 10))
    assert (fetch_error.kind, read_error.kind) == ("denied", "denied")
    assert "check the store's credentials" in fetch_error.detail


def test_a_publish_refused_midway_leaves_no_tree(s3_env: S3Server, bucket: str, trees: S3Trees,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    """A writer allowed to write blobs but not manifests: every blob is stored before the
    manifest is tried, and without the manifest there is no tree."""
    writer = s3_env.create_user([
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
         "Resource": f"arn:aws:s3:::{bucket}/store/v1/blobs/*"},
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"}])
    source = write_files(tmp_path / "source", FILES)
    use_server_env(writer, monkeypatch)
    with s3_env.enforcing_auth():
        error = source_error(lambda: trees.publish("compiled/demo", source))
    assert (error.kind, error.where) == ("denied", f"{trees.tree_url('compiled/demo')}"
                                                   "/manifest.json")
    use_server_env(s3_env.env(), monkeypatch)
    assert blob_keys(s3_env, bucket, "store/v1") == {sha256(data) for data in FILES.values()}
    assert not trees.exists("compiled/demo")
    url, destination = trees.tree_url("compiled/demo"), tmp_path / "fetched"
    destination.mkdir()
    assert source_error(lambda: fetch_tree(url, destination)).kind == "not_found"


# --- plain objects -------------------------------------------------------------------------

def test_read_object_on_an_unversioned_bucket(s3_env: S3Server, bucket: str) -> None:
    s3_env.client().put_object(Bucket=bucket, Key="a/config.json", Body=b'{"r": 8}')
    fetched = read_object(f"s3://{bucket}/a/config.json", 8)
    head = s3_env.client().head_object(Bucket=bucket, Key="a/config.json")
    assert (fetched.data, fetched.etag, fetched.version_id) == (b'{"r": 8}', head["ETag"], None)


def test_read_object_on_a_versioned_bucket(s3_env: S3Server) -> None:
    bucket = s3_env.create_bucket(new_bucket_name(), versioned=True)
    s3 = s3_env.client()
    s3.put_object(Bucket=bucket, Key="config.json", Body=b"first")
    latest = s3.put_object(Bucket=bucket, Key="config.json", Body=b"second")
    fetched = read_object(f"s3://{bucket}/config.json", 100)
    assert (fetched.data, fetched.version_id) == (b"second", latest["VersionId"])
    assert fetched.etag == latest["ETag"]


def test_read_object_refuses_what_is_too_large(s3_env: S3Server, bucket: str) -> None:
    s3_env.client().put_object(Bucket=bucket, Key="big", Body=b"b" * 100)
    error = source_error(lambda: read_object(f"s3://{bucket}/big", 99))
    assert (error.kind, error.where) == ("too_large", f"s3://{bucket}/big")
    assert read_object(f"s3://{bucket}/big", 100).data == b"b" * 100


def test_read_object_missing_is_not_found(s3_env: S3Server, bucket: str) -> None:
    error = source_error(lambda: read_object(f"s3://{bucket}/missing.json", 100))
    assert (error.kind, error.where) == ("not_found", f"s3://{bucket}/missing.json")


# --- the local cache -----------------------------------------------------------------------

def test_opening_twice_fetches_once(tree_url: str, tmp_path: Path) -> None:
    calls = []

    def counting_fetch(url: str, destination: Path) -> None:
        calls.append(url)
        fetch_tree(url, destination)

    cache = TreeCache(tmp_path / "cache", 10**9)
    with cache.open(tree_url, counting_fetch) as first:
        assert read_files(first.path) == FILES
    with cache.open(tree_url, counting_fetch) as second:
        assert second.path == first.path
        assert read_files(second.path) == FILES
    assert calls == [tree_url]


def test_two_processes_opening_together_fetch_once(s3_env: S3Server, tree_url: str,
                                                   tmp_path: Path) -> None:
    """The second process starts while the first is fetching and waits on the entry's lock
    (seen in /proc/locks) until that fetch lands; then it reads what the first fetched."""
    root, calls, gate = tmp_path / "cache", tmp_path / "calls", tmp_path / "gate"
    calls.mkdir()

    def start() -> subprocess.Popen:
        return subprocess.Popen(  # the environment (s3_env's) leads it to the same server
            [sys.executable, "-c", OPEN_SCRIPT, str(root), tree_url, str(calls), str(gate)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start()
    wait_for(lambda: any(calls.iterdir()), "the first fetch")
    second = start()
    wait_for(lambda: lock_waiters(lock_file(root, tree_url)) == 1, "the second to wait")
    gate.touch()
    outputs = [process.communicate(timeout=DEADLINE_S) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    expected = {name: sha256(data) for name, data in FILES.items()}
    assert [json.loads(stdout) for stdout, _ in outputs] == [expected, expected]
    assert len(list(calls.iterdir())) == 1


def test_two_threads_opening_together_fetch_once(tmp_path: Path) -> None:
    root, url, gate = tmp_path / "cache", "s3://bucket/store/compiled/t", threading.Event()
    fetch = FakeFetch(10)

    def gated_fetch(url: str, destination: Path) -> None:
        assert gate.wait(DEADLINE_S)
        fetch(url, destination)

    cache = TreeCache(root, 10**9)
    opened = []
    threads = [threading.Thread(target=lambda: opened.append(cache.open(url, gated_fetch)))
               for _ in range(2)]
    threads[0].start()
    wait_for(lambda: lock_file(root, url).exists() and any(root.glob(".incoming-*")),
             "the first fetch")
    threads[1].start()
    wait_for(lambda: lock_waiters(lock_file(root, url)) == 1, "the second to wait")
    gate.set()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert len(opened) == 2 and opened[0].path == opened[1].path
    assert fetch.calls == [url]
    for tree in opened:
        tree.release()


def test_eviction_removes_the_least_recently_used_and_never_a_held_entry(
        tmp_path: Path) -> None:
    """Entries of 100 bytes in a cache of 250: a third entry evicts one. Last-use times are
    set explicitly, as the clock may not tick between two opens."""
    root, fetch = tmp_path / "cache", FakeFetch(100)
    cache = TreeCache(root, 250)

    def open_at(url: str, last_used: float) -> Path:
        with cache.open(url, fetch) as tree:
            os.utime(tree.path, (last_used, last_used))
            return tree.path

    now = time.time()
    a, b = open_at("s3://b/s/t/a", now - 500), open_at("s3://b/s/t/b", now - 400)
    c = open_at("s3://b/s/t/c", now - 300)
    assert (a.exists(), b.exists(), c.exists()) == (False, True, True)

    holder = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(root), "s3://b/s/t/b"],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        os.utime(b, (now - 400, now - 400))  # the holder's open used it: make it oldest again
        d = open_at("s3://b/s/t/d", now - 200)
        assert (b.exists(), c.exists(), d.exists()) == (True, False, True)
    finally:
        holder.stdin.close()
        assert holder.wait(DEADLINE_S) == 0
    e = open_at("s3://b/s/t/e", now - 100)
    assert (b.exists(), d.exists(), e.exists()) == (False, True, True)
    assert len(fetch.calls) == 5


def test_an_entry_larger_than_the_cache_is_still_served(tmp_path: Path) -> None:
    cache = TreeCache(tmp_path / "cache", 50)
    with cache.open("s3://b/s/t/big", FakeFetch(100)) as tree:
        assert (tree.path / "data").stat().st_size == 100


def test_a_failed_fetch_leaves_nothing_and_raises_its_error(tmp_path: Path) -> None:
    failure = RuntimeError("the store broke")

    def failing_fetch(url: str, destination: Path) -> None:
        (destination / "partial").write_bytes(b"half")
        raise failure

    cache = TreeCache(tmp_path / "cache", 10**9)
    with pytest.raises(RuntimeError) as raised:
        cache.open("s3://b/s/t/x", failing_fetch)
    assert raised.value is failure
    assert [path.name for path in cache.root.iterdir()] == [".locks"]
    with cache.open("s3://b/s/t/x", FakeFetch(5)) as tree:
        assert (tree.path / "data").read_bytes() == b"xxxxx"


def test_abandoned_staging_directories_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    abandoned = write_files(root / ".incoming-abandoned", {"part": b"x"})
    live = write_files(root / ".incoming-live", {"part": b"x"})
    two_hours_ago = time.time() - 7200
    for path in (abandoned / "part", abandoned):
        os.utime(path, (two_hours_ago, two_hours_ago))
    TreeCache(root, 10**9).open("s3://b/s/t/new", FakeFetch(1)).release()
    assert (abandoned.exists(), live.exists()) == (False, True)


def test_cache_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DORA_GATEWAY_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv(CACHE_MAX_BYTES_ENV, raising=False)
    default = cache_from_env()
    assert (default.root, default.max_bytes) == (paths.home() / "cache", DEFAULT_MAX_BYTES)
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    monkeypatch.setenv(CACHE_MAX_BYTES_ENV, "1234")
    configured = cache_from_env()
    assert (configured.root, configured.max_bytes) == (tmp_path / "elsewhere", 1234)
    monkeypatch.setenv(CACHE_MAX_BYTES_ENV, "ten gigs")
    with pytest.raises(ValueError, match=CACHE_MAX_BYTES_ENV):
        cache_from_env()
