"""Tenants, API-key lookup and per-tenant concurrency limits.

Only sha256 digests of keys are kept, and a presented key is compared against every stored
digest with `hmac.compare_digest`, without stopping at a match, so neither the key nor which
tenant owns it leaks through response timing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway.errors import RateLimited

ALL_ADAPTERS = "*"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
Owner = TypeVar("Owner")


def valid_name(name: object) -> bool:
    """Adapter and tenant names: safe as a directory name and in a URL path (fullmatch, as
    `$` would accept a trailing newline)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def tenant_cache_salt(secret: bytes, tenant: str) -> str:
    """vLLM's `cache_salt`: one prefix-cache namespace per tenant, unguessable without the
    gateway's secret."""
    return hashlib.sha256(secret + b"\0" + tenant.encode()).hexdigest()


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None."""
    if not authorization:
        return None
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


@dataclass(frozen=True)
class Tenant:
    name: str
    key_digests: tuple[bytes, ...]
    adapters: frozenset[str]
    max_concurrency: int
    max_tokens: int

    def may_use(self, adapter: str) -> bool:
        return ALL_ADAPTERS in self.adapters or adapter in self.adapters


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


class Lease:
    """One held concurrency slot; releasing twice is harmless (streams release in finally)."""

    def __init__(self, limiter: ConcurrencyLimiter) -> None:
        self._limiter: ConcurrencyLimiter | None = limiter

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter.in_flight -= 1
            self._limiter = None


class ConcurrencyLimiter:
    """Non-blocking: a tenant over its limit is told to retry (429) rather than queued,
    so one tenant cannot pile up requests in front of the others."""

    def __init__(self, tenant: str, limit: int) -> None:
        self.tenant = tenant
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> Lease:
        if self.in_flight >= self.limit:
            raise RateLimited(f"Too many concurrent requests for this API key "
                              f"(limit {self.limit}); retry when one has finished")
        self.in_flight += 1
        return Lease(self)
