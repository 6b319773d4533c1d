"""Adapters and base models on the Hugging Face Hub, through `huggingface_hub`.

Everything goes through the library and its cache, so HF_HOME / HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE mean here what they mean to vLLM and every other Hub client, and a file already
in the cache is not downloaded again. What the library or its HTTP client raises becomes a
`SourceError` naming the hf:// URL (a `BaseModelError` for a base model), so a bad URL gets a
400 and a failing Hub a 502.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import constants, get_cached_repo_tree, is_offline_mode, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    DryRunError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from adapters.errors import BaseModelError, SourceError
from adapters.peft_adapter import CONFIG_FILE, WEIGHTS_FILE

SCHEME = "hf://"
PEFT_FILES = (CONFIG_FILE, WEIGHTS_FILE)
FORM = "hf://org/repo[@revision][/subfolder]"
# A revision or one subfolder segment: a safe subset of what git and the Hub accept. No glob
# characters (the subfolder becomes an `allow_patterns` pattern) and no leading dot ("..").
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class HubSource:
    """A PEFT adapter directory in a Hub model repo: `hf://org/repo[@revision][/subfolder]`.

    `revision` is a branch, a tag or a commit (None: the default branch); it cannot contain a
    slash, because the first slash after the repo starts the subfolder.
    """

    repo_id: str
    revision: str | None = None
    subfolder: str = ""

    @classmethod
    def parse(cls, url: str) -> HubSource:
        if not url.startswith(SCHEME):
            raise SourceError("invalid", url, f"a Hub source has the form {FORM}")
        org, _, rest = url.removeprefix(SCHEME).partition("/")
        repo_and_revision, *folders = rest.split("/")
        repo, at, revision = repo_and_revision.partition("@")
        problem = _problem(org, repo, revision if at else None, folders)
        if problem:
            raise SourceError("invalid", url, f"{problem}; expected {FORM}")
        return cls(f"{org}/{repo}", revision if at else None, "/".join(folders))

    def path_in_repo(self, name: str) -> str:
        return f"{self.subfolder}/{name}" if self.subfolder else name

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision is not None else ""
        subfolder = f"/{self.subfolder}" if self.subfolder else ""
        return f"{SCHEME}{self.repo_id}{revision}{subfolder}"


@dataclass(frozen=True)
class HubAdapter:
    """The adapter's two files, in the library's cache: `directory` is `subfolder` inside the
    snapshot of `commit`. The cache is shared; read the files, never change them."""

    directory: Path
    commit: str


def fetch_adapter(source: HubSource, max_bytes: int) -> HubAdapter:
    """The PEFT files at `source`, downloaded into the Hub cache unless already there.

    `max_bytes` bounds the two files together: checked against the sizes the Hub lists before
    anything is downloaded when it can be asked, and always against the files on disk.
    """
    with _hub_errors(source):
        snapshot = Path(_download(source, max_bytes))
        directory = snapshot / source.subfolder
        missing = [name for name in PEFT_FILES if not (directory / name).is_file()]
        if missing:
            raise _missing_files(source, snapshot.name, missing)
    size = sum((directory / name).stat().st_size for name in PEFT_FILES)
    _check_size(str(source), size, max_bytes)
    return HubAdapter(directory, snapshot.name)


def local_snapshot(model_id: str, revision: str | None = None) -> Path:
    """The cached snapshot of base model `model_id`, where vLLM downloaded it; never downloads.

    Only config.json is asked for: vLLM downloads just the weight format it loads, so the cached
    file listing names files that were never meant to be fetched, and asking for the whole repo
    would call the snapshot incomplete. `BaseCheckpoint` checks the weights.
    """
    try:
        return Path(snapshot_download(model_id, revision=revision, local_files_only=True,
                                      allow_patterns=CONFIG_FILE))
    except HFValidationError as error:
        raise BaseModelError(f"{model_id} is neither a local directory nor a Hugging Face "
                             f"model id: {error}") from error
    except LocalEntryNotFoundError as error:
        at = f" at {revision}" if revision else ""
        raise BaseModelError(
            f"cannot find a local snapshot of {model_id}{at} in the Hugging Face cache at "
            f"{constants.HF_HUB_CACHE}: start vLLM with it first, or give the model as a local "
            "directory") from error


def _problem(org: str, repo: str, revision: str | None, folders: list[str]) -> str | None:
    if not org or not repo:
        return "the repo must be org/repo"
    try:
        validate_repo_id(f"{org}/{repo}")
    except HFValidationError as error:
        return str(error)
    if revision is not None and (not NAME.fullmatch(revision) or ".." in revision):
        return f"{revision!r} is not a branch, tag or commit"
    bad = [folder for folder in folders if not NAME.fullmatch(folder)]
    return f"{bad[0]!r} is not a subfolder name" if bad else None


def _download(source: HubSource, max_bytes: int) -> str:
    """The snapshot folder holding the PEFT files of `source`.

    `snapshot_download` rather than `hf_hub_download` per file: it resolves the revision to one
    commit and fetches both files at that commit, so a push in between cannot pair one commit's
    config with another's weights, and offline it answers from the cache's refs and snapshots.
    Its dry run gives the sizes and the commit without downloading; it fails when the Hub
    cannot be asked, and the real call then answers from the cache or says what is wrong.
    """
    patterns = [source.path_in_repo(name) for name in PEFT_FILES]
    revision = source.revision
    try:
        planned = snapshot_download(source.repo_id, revision=revision, allow_patterns=patterns,
                                    dry_run=True)
    except DryRunError:
        planned = []
    if planned:
        _check_size(str(source), sum(info.file_size or 0 for info in planned), max_bytes)
        revision = planned[0].commit_hash
    return snapshot_download(source.repo_id, revision=revision, allow_patterns=patterns)


def _missing_files(source: HubSource, commit: str, missing: list[str]) -> SourceError:
    """not_found when the commit's cached file listing shows the repo lacks the files (the
    library lists a commit whenever it can ask the Hub, and would have fetched listed files);
    without a listing the Hub was not asked, so they may well exist: unavailable."""
    names = " and ".join(source.path_in_repo(name) for name in missing)
    try:
        get_cached_repo_tree(source.repo_id, revision=commit)
    except CachedRepoTreeNotFoundError:
        return SourceError("unavailable", str(source),
                           f"{names} not in the Hugging Face cache (commit {commit}) and "
                           f"{_hub_not_asked()}")
    return SourceError("not_found", str(source),
                       f"{source.repo_id} has no {names} at commit {commit}")


def _check_size(url: str, total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise SourceError("too_large", url, f"the adapter files are {total} bytes, more than "
                                            f"the limit of {max_bytes}")


@contextlib.contextmanager
def _hub_errors(source: HubSource) -> Iterator[None]:
    """Every error of the library, of its HTTP client and of the cache on disk (all OSErrors
    but the client's) as a SourceError of the right kind."""
    try:
        yield
    except (OSError, httpx2.HTTPError) as error:
        raise _source_error(source, error) from error


def _source_error(source: HubSource, error: Exception) -> SourceError:
    url, repo = str(source), source.repo_id
    if isinstance(error, GatedRepoError):
        return SourceError("denied", url, f"{repo} is gated: accept its conditions on the Hub "
                                          "with the account whose token is in HF_TOKEN")
    if isinstance(error, RepositoryNotFoundError):
        return SourceError("not_found", url, f"no repository {repo} on the Hub (a private one "
                                             "needs an HF_TOKEN that can read it)")
    if isinstance(error, RevisionNotFoundError):
        return SourceError("not_found", url, f"{repo} has no revision "
                                             f"{source.revision or constants.DEFAULT_REVISION}")
    if isinstance(error, LocalEntryNotFoundError):
        return SourceError("unavailable", url, "not in the Hugging Face cache at "
                                               f"{constants.HF_HUB_CACHE} and {_hub_not_asked()}")
    if isinstance(error, HfHubHTTPError):
        return _http_error(url, repo, error)
    return SourceError("unavailable", url, f"the Hub could not be reached: {error}")


def _http_error(url: str, repo: str, error: HfHubHTTPError) -> SourceError:
    status = error.response.status_code
    if status in (401, 403):
        return SourceError("denied", url, f"the Hub refused access ({status}): HF_TOKEN is "
                                          f"missing or cannot read {repo}")
    if status == 404:
        return SourceError("not_found", url, f"not on the Hub: {error}")
    return SourceError("unavailable", url, f"the Hub failed ({status}): {error}")


def _hub_not_asked() -> str:
    if is_offline_mode():
        return "HF_HUB_OFFLINE is set, so the Hub was not asked"
    return "the Hub could not be reached"
