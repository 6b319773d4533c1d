"""API keys: how the config writes them, the digests kept of them, and finding a key's owner.

A config gives a key plain, as `sha256:<hex>` (so the file holds no usable key) or as `env:VAR`
(a container secret); only its sha256 digest is kept after loading. A presented key is
compared against every stored digest with `hmac.compare_digest`, without stopping at a match,
so neither the key nor which owner it belongs to leaks through response timing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

MIN_KEY_CHARS = 16
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
Owner = TypeVar("Owner")


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_secret(spec: str, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """(secret, problem): `env:VAR` reads the environment, anything else is the secret."""
    if not spec.startswith("env:"):
        return spec, None
    variable = spec[len("env:"):]
    value = environ.get(variable, "")
    if not value:
        return "", f"environment variable {variable!r} is not set or empty"
    return value, None


def parse_key(spec: str, environ: Mapping[str, str]) -> tuple[bytes, str | None]:
    """(sha256 digest, problem) of a key given plain, as `sha256:<hex>` or as `env:VAR`."""
    if spec.startswith("sha256:"):
        hex_digest = spec[len("sha256:"):]
        if SHA256_HEX.fullmatch(hex_digest) is None:
            return b"", "a sha256: key must be followed by 64 hex digits"
        return bytes.fromhex(hex_digest), None
    key, problem = parse_secret(spec, environ)
    if problem:
        return b"", problem
    if len(key) < MIN_KEY_CHARS:
        return b"", f"a key must have at least {MIN_KEY_CHARS} characters"
    return key_digest(key), None


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None."""
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


class KeyRing(Generic[Owner]):
    """Maps key digests to their owner (a tenant, or the admin role)."""

    def __init__(self, entries: Iterable[tuple[bytes, Owner]]) -> None:
        self._entries = list(entries)

    def lookup(self, key: str | None) -> Owner | None:
        if key is None:
            return None
        presented = key_digest(key)
        found = None
        for digest, owner in self._entries:
            if hmac.compare_digest(digest, presented):
                found = owner
        return found
