"""Who is calling: a tenant (for `/v1`), an admin (for `/admin`) or a metrics reader (for
`/metrics` and `/dashboard`), from the bearer key.

The key rings are separate, so a tenant key never opens the admin API or the metrics, and an
admin key is not a tenant (it does open the metrics). Each tenant has its concurrency limiter
and its prefix-cache salt.
"""

from __future__ import annotations

from starlette.requests import Request

from gateway.config import GatewayConfig, MetricsConfig
from gateway.errors import AuthenticationFailed
from gateway.tenancy.tenants import (
    ConcurrencyLimiter,
    KeyRing,
    Tenant,
    bearer_key,
    tenant_cache_salt,
)

MISSING_KEY = ("You didn't provide an API key. You need to provide your API key in an "
               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)")
WRONG_KEY = "Incorrect API key provided"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1"})


class Access:
    def __init__(self, config: GatewayConfig) -> None:
        self._tenants = KeyRing((digest, tenant) for tenant in config.tenants
                                for digest in tenant.key_digests)
        self._admins = KeyRing((digest, True) for digest in config.admin_key_digests)
        self._metrics_readers = KeyRing((digest, True) for digest in (
            *config.admin_key_digests, *config.metrics.key_digests))
        self._metrics_config = config.metrics
        self.limiters = {tenant.name: ConcurrencyLimiter(tenant.name, tenant.max_concurrency)
                         for tenant in config.tenants}
        self.cache_salts = {tenant.name: tenant_cache_salt(config.server.cache_salt_secret,
                                                           tenant.name)
                            for tenant in config.tenants}

    def tenant(self, request: Request) -> Tenant:
        tenant = self._tenants.lookup(_key(request))
        if tenant is None:
            raise AuthenticationFailed(WRONG_KEY)
        return tenant

    def admin(self, request: Request) -> None:
        if self._admins.lookup(_key(request)) is None:
            raise AuthenticationFailed(WRONG_KEY)

    def metrics_reader(self, request: Request) -> None:
        if not needs_metrics_key(self._metrics_config, request):
            return
        if self._metrics_readers.lookup(_key(request)) is None:
            raise AuthenticationFailed(WRONG_KEY)


def needs_metrics_key(config: MetricsConfig, request: Request) -> bool:
    """"local" trusts the loopback interface: put a reverse proxy on the same host in front of
    the gateway only with access = "key"."""
    if config.access == "open":
        return False
    client = request.client.host if request.client else None
    return config.access == "key" or client not in LOOPBACK_HOSTS


def _key(request: Request) -> str:
    key = bearer_key(request.headers.get("authorization"))
    if key is None:
        raise AuthenticationFailed(MISSING_KEY)
    return key
