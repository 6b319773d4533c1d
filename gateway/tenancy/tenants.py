"""A tenant: its keys, the adapters it may use, its limits, and its prefix-cache namespace."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gateway.quota.policy import TenantLimits

ALL_ADAPTERS = "*"


@dataclass(frozen=True)
class Tenant:
    name: str
    key_digests: tuple[bytes, ...]
    adapters: frozenset[str]
    max_concurrency: int
    max_tokens: int
    limits: TenantLimits = field(default_factory=TenantLimits)

    def may_use(self, adapter: str) -> bool:
        return ALL_ADAPTERS in self.adapters or adapter in self.adapters


def tenant_cache_salt(secret: bytes, tenant: str) -> str:
    """vLLM's `cache_salt`: one prefix-cache namespace per tenant, unguessable without the
    gateway's secret."""
    return hashlib.sha256(secret + b"\0" + tenant.encode()).hexdigest()
