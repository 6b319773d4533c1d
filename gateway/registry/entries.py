"""What the registry knows about one adapter, in memory and in the database alike."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.errors import InvalidRequest
from gateway.names import BASE_MODEL, NAME_RULE, valid_name

# `added_by` of the adapters the gateway registers from `[adapters] dir` at start.
ADAPTERS_DIR = "adapters-dir"


class Origin(StrEnum):
    """How an adapter came in: found in `[adapters] dir` at start, added from a path under a
    root, uploaded, or fetched from an `s3://` or `hf://` URL (the last two are kept in the
    store, so every gateway can compile them again from the same bytes)."""

    DIRECTORY = "directory"
    PATH = "path"
    UPLOAD = "upload"
    URL = "url"


@dataclass(frozen=True)
class AdapterEntry:
    """A registered adapter. `source` is where its files are: a path under a root, or the
    store's kept copy. `artifact` names the compiled artifact in the content-addressed store
    and `location` is what vLLM loads (its path, or its `s3://` URL): immutable, so every
    gateway and backend may read it at once. `added_by` names the admin key (by its digest's
    first hex digits) or `ADAPTERS_DIR`; `fetched_from` is the URL an `Origin.URL` adapter
    came from and what it resolved to (object versions, the Hub commit)."""

    name: str
    source: str
    content_hash: str
    artifact: str
    location: str
    is_dora: bool
    compile_seconds: float
    created: int
    origin: Origin
    added_by: str
    fetched_from: str | None = None

    @property
    def internal_name(self) -> str:
        return f"{self.name}--{self.content_hash[:16]}"


def check_name(name: str) -> None:
    if not valid_name(name) or name == BASE_MODEL:
        raise InvalidRequest(f"Invalid adapter name '{name}': use {NAME_RULE}, and not "
                             f"'{BASE_MODEL}'", param="name", code="invalid_adapter_name")
