"""hf:// adapters and cached base models, against a Hub cache written offline (`hub_cache`).

The library runs for real, offline (HF_HUB_OFFLINE=1): what it reads from the cache is what
these tests check. Errors only the Hub can give are raised by hand to check how they map.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

import adapters.hub
from adapters.errors import BaseModelError, SourceError
from adapters.hub import PEFT_FILES, HubSource, fetch_adapter, local_snapshot
from adapters.paths import demo_adapters_dir
from tests.hub_cache import cache_repo

ROOT = Path(__file__).resolve().parent.parent
OLD = hashlib.sha1(b"old").hexdigest()
NEW = hashlib.sha1(b"new").hexdigest()
REPO = "acme/styles"
SUBFOLDER = "styles/caps"
LIMIT = 1 << 30


def demo_files(name: str, subfolder: str = "") -> dict[str, Path]:
    prefix = f"{subfolder}/" if subfolder else ""
    return {f"{prefix}{file}": demo_adapters_dir() / name / file for file in PEFT_FILES}


def demo_size(name: str) -> int:
    return sum((demo_adapters_dir() / name / file).stat().st_size for file in PEFT_FILES)


@pytest.fixture
def styles_repo(hub_cache: Path) -> Path:
    """acme/styles: commit OLD has caps (tag v1), commit NEW has pirate (main), each both at
    the root and in styles/caps."""
    for commit, name, refs in ((OLD, "caps", ("v1",)), (NEW, "pirate", ("main",))):
        cache_repo(hub_cache, REPO, demo_files(name) | demo_files(name, SUBFOLDER), commit,
                   refs=refs)
    return hub_cache


@pytest.mark.parametrize(("url", "expected"), [
    ("hf://acme/styles", HubSource("acme/styles")),
    ("hf://acme/styles@main", HubSource("acme/styles", "main")),
    ("hf://acme/styles@v1.0-rc_1", HubSource("acme/styles", "v1.0-rc_1")),
    (f"hf://acme/styles@{OLD}/caps", HubSource("acme/styles", OLD, "caps")),
    ("hf://Acme-Lab/my.styles_2/a/b_c/d.e", HubSource("Acme-Lab/my.styles_2", None, "a/b_c/d.e")),
])
def test_parse_valid_urls_and_back(url: str, expected: HubSource) -> None:
    assert HubSource.parse(url) == expected
    assert str(expected) == url


@pytest.mark.parametrize("url", [
    "s3://acme/styles", "hf://", "hf://styles", "hf:///styles", "hf://acme/", "hf://acme//x",
    "hf://acme/styles/", "hf://acme/styles//caps", "hf://acme/styles/../caps",
    "hf://acme/styles/./caps", "hf://acme/styles/.hidden", "hf://acme/styles/c*ps",
    "hf://acme/styles@", "hf://acme/styles@@main", "hf://acme/styles@main@v2",
    "hf://acme/styles@a..b", "hf://acme/styles@.main", "hf://acme/sty les", "hf://ac--me/styles",
    "hf://acme/styles.git", "hf://acme/styles?x=1", "hf://acme/styles#main",
])
def test_parse_rejects_malformed_urls(url: str) -> None:
    with pytest.raises(SourceError) as caught:
        HubSource.parse(url)
    assert (caught.value.kind, caught.value.where) == ("invalid", url)
    assert "hf://org/repo" in caught.value.detail


@pytest.mark.parametrize(("revision", "commit", "content"), [
    (None, NEW, "pirate"), ("main", NEW, "pirate"), ("v1", OLD, "caps"), (OLD, OLD, "caps"),
    (NEW, NEW, "pirate"),
])
@pytest.mark.parametrize("subfolder", ["", SUBFOLDER])
def test_fetch_gives_the_files_of_the_resolved_commit(styles_repo: Path, subfolder: str,
                                                      revision: str | None, commit: str,
                                                      content: str) -> None:
    adapter = fetch_adapter(HubSource(REPO, revision, subfolder), LIMIT)
    snapshot = styles_repo / "models--acme--styles" / "snapshots" / commit
    assert adapter.commit == commit
    assert adapter.directory == snapshot / subfolder
    for name in PEFT_FILES:
        expected = (demo_adapters_dir() / content / name).read_bytes()
        assert (adapter.directory / name).read_bytes() == expected


def test_the_resolved_commit_pins_the_same_files(styles_repo: Path) -> None:
    """What a restart does: fetch again at the commit the first fetch resolved to."""
    first = fetch_adapter(HubSource.parse(f"hf://{REPO}/{SUBFOLDER}"), LIMIT)
    pinned = fetch_adapter(HubSource(REPO, first.commit, SUBFOLDER), LIMIT)
    assert (pinned.commit, pinned.directory) == (first.commit, first.directory)


@pytest.mark.parametrize("url", ["hf://acme/elsewhere", "hf://acme/styles@no-such-branch",
                                 f"hf://acme/styles@{'0' * 40}"])
def test_nothing_cached_while_offline_is_unavailable(styles_repo: Path, url: str) -> None:
    with pytest.raises(SourceError) as caught:
        fetch_adapter(HubSource.parse(url), LIMIT)
    assert (caught.value.kind, caught.value.where) == ("unavailable", url)
    assert "HF_HUB_OFFLINE is set" in caught.value.detail


def test_a_subfolder_the_listing_lacks_is_not_found(styles_repo: Path) -> None:
    """The commit's cached listing says what the repo holds, so offline can still say no."""
    with pytest.raises(SourceError) as caught:
        fetch_adapter(HubSource(REPO, OLD, "styles/brief"), LIMIT)
    error = caught.value
    assert (error.kind, error.where) == ("not_found", f"hf://{REPO}@{OLD}/styles/brief")
    for name in PEFT_FILES:
        assert f"styles/brief/{name}" in error.detail


def test_a_missing_file_is_named(hub_cache: Path) -> None:
    files = demo_files("caps")
    del files["adapter_model.safetensors"]
    cache_repo(hub_cache, REPO, files, OLD)
    with pytest.raises(SourceError) as caught:
        fetch_adapter(HubSource(REPO), LIMIT)
    assert caught.value.kind == "not_found"
    assert "no adapter_model.safetensors at commit" in caught.value.detail
    assert "adapter_config.json" not in caught.value.detail


def test_missing_files_without_a_listing_are_unavailable(hub_cache: Path) -> None:
    """Without the listing the cache cannot tell a file the repo lacks from one never fetched."""
    cache_repo(hub_cache, REPO, demo_files("caps"), OLD, listing=False)
    with pytest.raises(SourceError) as caught:
        fetch_adapter(HubSource(REPO, None, "styles/brief"), LIMIT)
    assert caught.value.kind == "unavailable"
    assert "HF_HUB_OFFLINE is set" in caught.value.detail


@pytest.mark.parametrize("revision", [None, OLD])
def test_an_interrupted_download_is_unavailable(hub_cache: Path, revision: str | None) -> None:
    cache_repo(hub_cache, REPO, demo_files("caps"), OLD,
               not_downloaded={"adapter_model.safetensors"})
    with pytest.raises(SourceError) as caught:
        fetch_adapter(HubSource(REPO, revision), LIMIT)
    assert caught.value.kind == "unavailable"


@pytest.mark.parametrize("revision", [None, OLD])
@pytest.mark.parametrize("subfolder", ["", SUBFOLDER])
def test_max_bytes_bounds_both_files_together(styles_repo: Path, revision: str | None,
                                              subfolder: str) -> None:
    """At the commit the dry run gives the sizes; at a branch offline the files on disk do."""
    source = HubSource(REPO, revision, subfolder)
    size = demo_size("pirate" if revision is None else "caps")
    assert fetch_adapter(source, size).directory.is_dir()
    with pytest.raises(SourceError) as caught:
        fetch_adapter(source, size - 1)
    assert (caught.value.kind, caught.value.where) == ("too_large", str(source))
    assert f"{size} bytes" in caught.value.detail


def test_too_large_at_a_listed_commit_is_refused_before_downloading(
        styles_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dry run's sizes refuse it: the real (downloading) call is never made."""
    calls = []
    real = adapters.hub.snapshot_download

    def spy(*args: object, **kwargs: object) -> object:
        calls.append("dry run" if kwargs.get("dry_run") else "download")
        return real(*args, **kwargs)

    monkeypatch.setattr(adapters.hub, "snapshot_download", spy)
    with pytest.raises(SourceError, match="more than the limit"):
        fetch_adapter(HubSource(REPO, OLD), demo_size("caps") - 1)
    assert calls == ["dry run"]


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x"))


@pytest.mark.parametrize(("error", "kind", "phrase"), [
    (GatedRepoError("gated", response=_response(403)), "denied", "HF_TOKEN"),
    (RepositoryNotFoundError("nope", response=_response(401)), "not_found", "HF_TOKEN"),
    (RevisionNotFoundError("nope", response=_response(404)), "not_found", "revision main"),
    (HfHubHTTPError("forbidden", response=_response(403)), "denied", "HF_TOKEN"),
    (HfHubHTTPError("unauthorized", response=_response(401)), "denied", "HF_TOKEN"),
    (HfHubHTTPError("gone", response=_response(404)), "not_found", "gone"),
    (HfHubHTTPError("down", response=_response(503)), "unavailable", "503"),
    (httpx2.ConnectTimeout("timed out"), "unavailable", "timed out"),
    (httpx2.RemoteProtocolError("peer closed"), "unavailable", "peer closed"),
    (ConnectionResetError("reset"), "unavailable", "reset"),
])
def test_hub_errors_become_source_errors(hub_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                         error: Exception, kind: str, phrase: str) -> None:
    def failing(*args: object, **kwargs: object) -> str:
        raise error

    monkeypatch.setattr(adapters.hub, "snapshot_download", failing)
    with pytest.raises(SourceError) as caught:
        fetch_adapter(HubSource(REPO), LIMIT)
    assert (caught.value.kind, caught.value.where) == (kind, f"hf://{REPO}")
    assert phrase in caught.value.detail
    assert caught.value.__cause__ is error


def _base_model(cache: Path, tmp_path: Path) -> Path:
    """A base model as vLLM leaves it: config and safetensors fetched, the .bin weights the
    repo also holds listed but never downloaded."""
    sources = tmp_path / "base-files"
    sources.mkdir()
    files = {}
    for name, data in (("config.json", json.dumps({"model_type": "llama"}).encode()),
                       ("model.safetensors", b"weights"), ("pytorch_model.bin", b"pickle")):
        files[name] = sources / name
        files[name].write_bytes(data)
    return cache_repo(cache, "acme/base", files, NEW, not_downloaded={"pytorch_model.bin"})


@pytest.mark.parametrize("revision", [None, "main", NEW])
def test_local_snapshot_finds_what_vllm_downloaded(hub_cache: Path, tmp_path: Path,
                                                   revision: str | None) -> None:
    snapshot = _base_model(hub_cache, tmp_path)
    assert local_snapshot("acme/base", revision) == snapshot
    assert json.loads((snapshot / "config.json").read_text()) == {"model_type": "llama"}


@pytest.mark.parametrize(("model_id", "revision"), [("acme/absent", None), ("acme/base", OLD),
                                                    ("acme/base", "dev")])
def test_local_snapshot_absent_names_the_model(hub_cache: Path, tmp_path: Path, model_id: str,
                                               revision: str | None) -> None:
    _base_model(hub_cache, tmp_path)
    with pytest.raises(BaseModelError, match=f"local snapshot of {model_id}") as caught:
        local_snapshot(model_id, revision)
    assert str(hub_cache) in str(caught.value)
    assert "start vLLM with it first" in str(caught.value)


def test_local_snapshot_of_a_path_that_is_no_model_id(hub_cache: Path) -> None:
    with pytest.raises(BaseModelError, match="neither a local directory nor a Hugging Face"):
        local_snapshot("./models/missing")


def test_environment_alone_is_honoured(tmp_path: Path) -> None:
    """HF_HUB_CACHE and HF_HUB_OFFLINE set before Python starts, nothing patched."""
    cache = tmp_path / "hub"
    cache_repo(cache, REPO, demo_files("caps", SUBFOLDER), OLD)
    _base_model(cache, tmp_path)
    script = ("from adapters.hub import HubSource, fetch_adapter, local_snapshot\n"
              f"print(fetch_adapter(HubSource.parse('hf://{REPO}/{SUBFOLDER}'), {LIMIT}))\n"
              "print(local_snapshot('acme/base'))\n")
    env = os.environ | {"HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(cache),
                        "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    root = cache.resolve()
    assert str(root / "models--acme--styles" / "snapshots" / OLD / SUBFOLDER) in result.stdout
    assert f"commit='{OLD}'" in result.stdout
    assert str(root / "models--acme--base" / "snapshots" / NEW) in result.stdout
