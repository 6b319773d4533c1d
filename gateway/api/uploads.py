"""Storing an uploaded adapter in the uploads directory, all at once or not at all.

The files land in a hidden temporary directory inside it (same filesystem), are flushed to
disk, and the directory is renamed to the adapter's content hash: whoever reads it (every
gateway and backend, when it is the shared store) sees either nothing or the whole adapter,
and the same files uploaded twice are stored once. With an object store the registry then
keeps the files there (`registry/artifacts.py`). Only the two PEFT files are accepted: no
pickles, no code, no paths.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from starlette.datastructures import FormData, UploadFile

from adapters.compile import adapter_content_hash
from adapters.peft_adapter import CONFIG_FILE, WEIGHTS_FILE
from gateway.errors import InvalidRequest

UPLOAD_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Parsing stops past this many parts; below it, every unexpected part is named in the error.
MAX_PARTS = 8


@dataclass(frozen=True)
class StoredUpload:
    """`created`: this upload put the directory there (it was not stored before)."""

    path: Path
    created: bool


def upload_parts(form: FormData) -> dict[str, UploadFile]:
    """The two files, by form field name; anything else is refused."""
    parts: dict[str, UploadFile] = {}
    for field, value in form.multi_items():
        if field not in UPLOAD_FILES or not isinstance(value, UploadFile):
            raise InvalidRequest(f"Unexpected form field '{field}': upload exactly the files "
                                 f"{' and '.join(UPLOAD_FILES)}", param=field,
                                 code="invalid_upload")
        if field in parts:
            raise InvalidRequest(f"'{field}' is given twice", param=field, code="invalid_upload")
        parts[field] = value
    missing = [name for name in UPLOAD_FILES if name not in parts]
    if missing:
        raise InvalidRequest(f"Missing file(s): {', '.join(missing)}", code="invalid_upload")
    return parts


async def store_upload(parts: dict[str, UploadFile], store: Path) -> StoredUpload:
    """Write the files as `store/<content hash>`."""
    store.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=store))
    try:
        for name, upload in parts.items():
            await asyncio.to_thread(_copy, upload.file, staging / name)
        return await asyncio.to_thread(_publish, staging, store)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy(source: BinaryIO, destination: Path) -> None:
    source.seek(0)
    with destination.open("wb") as handle:
        shutil.copyfileobj(source, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _publish(staging: Path, store: Path) -> StoredUpload:
    """Rename the finished directory to its content hash; an identical one already there is
    kept."""
    target = store / adapter_content_hash(staging)
    os.chmod(staging, 0o755)
    try:
        os.rename(staging, target)
    except OSError:
        if not (target / CONFIG_FILE).is_file():
            raise
        return StoredUpload(target, created=False)
    return StoredUpload(target, created=True)
