"""Storing an uploaded adapter under the adapters directory, all at once or not at all.

The files land in a hidden temporary directory beside the target (same filesystem) and are
renamed into place, so neither a crash nor the directory scan at start-up ever sees half an
adapter. Only the two PEFT files are accepted: no pickles, no code, no paths.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from starlette.datastructures import FormData, UploadFile

from adapters.peft_adapter import CONFIG_FILE, WEIGHTS_FILE
from gateway.errors import Conflict, InvalidRequest

UPLOAD_FILES = (CONFIG_FILE, WEIGHTS_FILE)
# Parsing stops past this many parts; below it, every unexpected part is named in the error.
MAX_PARTS = 8


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


async def store_upload(parts: dict[str, UploadFile], target: Path) -> None:
    """Write the files as the directory `target`, which must not exist yet."""
    if target.exists():
        raise _exists(target)
    staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=target.parent))
    try:
        for name, upload in parts.items():
            await asyncio.to_thread(_copy, upload.file, staging / name)
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, target)
        except OSError as exc:
            raise _exists(target) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy(source: BinaryIO, destination: Path) -> None:
    source.seek(0)
    with destination.open("wb") as handle:
        shutil.copyfileobj(source, handle)


def _exists(target: Path) -> Conflict:
    return Conflict(f"The adapters directory already has '{target.name}'; remove it there or "
                    f"choose another name", code="adapter_exists")
