"""What the registry knows about one adapter, in memory and in the database alike."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gateway.errors import InvalidRequest
from gateway.names import BASE_MODEL, NAME_RULE, valid_name

# `added_by` of the adapters the gateway registers from `[adapters] dir` at start.
ADAPTERS_DIR = "adapters-dir"


class Origin(StrEnum):
    """How an adapter came in: found in `[adapters] dir` at start, added from a path under a
    root, or uploaded (its files then live in the shared store)."""

    DIRECTORY = "directory"
    PATH = "path"
    UPLOAD = "upload"


@dataclass(frozen=True)
class AdapterEntry:
    """A registered adapter. `compiled_path` is the artifact in the content-addressed store
    (immutable, so every gateway and backend may read it at once); `added_by` names the admin
    key (by its digest's first hex digits) or `ADAPTERS_DIR`."""

    name: str
    source: Path
    content_hash: str
    compiled_path: Path
    is_dora: bool
    compile_seconds: float
    created: int
    origin: Origin
    added_by: str

    @property
    def internal_name(self) -> str:
        return f"{self.name}--{self.content_hash[:16]}"


def check_name(name: str) -> None:
    if not valid_name(name) or name == BASE_MODEL:
        raise InvalidRequest(f"Invalid adapter name '{name}': use {NAME_RULE}, and not "
                             f"'{BASE_MODEL}'", param="name", code="invalid_adapter_name")
