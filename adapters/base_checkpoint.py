"""Read-only access to a base model's safetensors checkpoint, one tensor at a time.

Compiling an adapter needs only the weights of the layers it targets, so we never load the
whole model: `safe_open` maps the file and reads the tensors we ask for.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from adapters.errors import BaseModelError

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
HASH_CHUNK_BYTES = 16 << 20


class BaseCheckpoint:
    """A Hugging Face model directory with safetensors weights."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()
        if not (self.directory / "config.json").is_file():
            raise BaseModelError(f"{self.directory} is not a model directory (no config.json)")
        if not self.weight_files:
            raise BaseModelError(f"{self.directory} has no safetensors weights")

    @cached_property
    def config(self) -> dict:
        return json.loads((self.directory / "config.json").read_text())

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> file name, from the shard index or the single file's header."""
        index = self.directory / SHARD_INDEX
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        if (self.directory / SINGLE_FILE).is_file():
            with safe_open(self.directory / SINGLE_FILE, framework="pt") as handle:
                return dict.fromkeys(handle.keys(), SINGLE_FILE)
        return {}

    @property
    def weight_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    @property
    def is_quantized(self) -> bool:
        return "quantization_config" in self.config

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.directory / self.weight_map[name], framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        with safe_open(self.directory / self.weight_map[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def tensors_of_file(self, file_name: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in one weight file, read one at a time."""
        with safe_open(self.directory / file_name, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, handle.get_tensor(name)

    def fingerprint(self) -> str:
        """sha256 over config.json and every weight file: identifies the exact weights.

        Memoised per file by (path, size, mtime) for the life of the process, so a long-lived
        gateway hashes a multi-GB model once.
        """
        digest = hashlib.sha256()
        digest.update((self.directory / "config.json").read_bytes())
        for file_name in self.weight_files:
            digest.update(file_name.encode())
            digest.update(bytes.fromhex(_file_sha256(self.directory / file_name)))
        return digest.hexdigest()


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]
