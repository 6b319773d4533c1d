"""Who is calling: a tenant (for `/v1`), an admin (for `/admin`) or a metrics reader (for
`/metrics` and `/dashboard`), from the bearer key; and what a tenant's request may take.

The key rings are separate, so a tenant key never opens the admin API or the metrics, and an
admin key is not a tenant (it does open the metrics). Each tenant has its concurrency limiter
and its prefix-cache salt, reached through `admit` and `cache_salt`.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request

from gateway.errors import AuthenticationFailed
from gateway.tenancy.keys import KeyRing, bearer_key
from gateway.tenancy.limits import ConcurrencyLimiter, Lease
from gateway.tenancy.tenants import Tenant, tenant_cache_salt

MISSING_KEY = ("You didn't provide an API key. You need to provide your API key in an "
               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)")
WRONG_KEY = "Incorrect API key provided"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1"})


class Access:
    """`metrics_access` is `[metrics] access`; admin keys also read the metrics."""

    def __init__(self, tenants: Sequence[Tenant], *, admin_keys: Sequence[bytes],
                 metrics_keys: Sequence[bytes], metrics_access: str,
                 cache_salt_secret: bytes) -> None:
        self._tenants = KeyRing((digest, tenant) for tenant in tenants
                                for digest in tenant.key_digests)
        self._admins = KeyRing((digest, admin_name(digest)) for digest in admin_keys)
        self._metrics_readers = KeyRing((digest, True) for digest in (*admin_keys,
                                                                        *metrics_keys))
        self._metrics_access = metrics_access
        self._limiters = {tenant.name: ConcurrencyLimiter(tenant.name, tenant.max_concurrency)
                          for tenant in tenants}
        self._cache_salts = {tenant.name: tenant_cache_salt(cache_salt_secret, tenant.name)
                             for tenant in tenants}

    def tenant(self, request: Request) -> Tenant:
        tenant = self._tenants.lookup(_key(request))
        if tenant is None:
            raise AuthenticationFailed(WRONG_KEY)
        return tenant

    def admin(self, request: Request) -> str:
        """The admin's name (`admin_name`), for the registry's record of who changed it."""
        admin = self._admins.lookup(_key(request))
        if admin is None:
            raise AuthenticationFailed(WRONG_KEY)
        return admin

    def metrics_reader(self, request: Request) -> None:
        if not needs_metrics_key(self._metrics_access, request):
            return
        if self._metrics_readers.lookup(_key(request)) is None:
            raise AuthenticationFailed(WRONG_KEY)

    def admit(self, tenant: Tenant) -> Lease:
        """A slot of the tenant's concurrency limit (429 when none is free)."""
        return self._limiters[tenant.name].acquire()

    def cache_salt(self, tenant: Tenant) -> str:
        return self._cache_salts[tenant.name]

    def in_flight(self) -> dict[str, int]:
        """Requests being answered, per tenant name."""
        return {name: limiter.in_flight for name, limiter in sorted(self._limiters.items())}


def admin_name(digest: bytes) -> str:
    """An admin key named by its sha256's first 12 hex digits: enough to tell keys apart
    (`printf %s "$KEY" | sha256sum`), nothing to log in with."""
    return f"admin:{digest.hex()[:12]}"


def needs_metrics_key(metrics_access: str, request: Request) -> bool:
    """"local" trusts the loopback interface: put a reverse proxy on the same host in front of
    the gateway only with access = "key"."""
    if metrics_access == "open":
        return False
    client = request.client.host if request.client else None
    return metrics_access == "key" or client not in LOOPBACK_HOSTS


def _key(request: Request) -> str:
    key = bearer_key(request.headers.get("authorization"))
    if key is None:
        raise AuthenticationFailed(MISSING_KEY)
    return key
