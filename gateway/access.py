"""Who is calling: a tenant (for `/v1`) or an admin (for `/admin`), from the bearer key.

The two key rings are separate, so a tenant key never opens the admin API and an admin key
is not a tenant. Each tenant has its concurrency limiter and its prefix-cache salt.
"""

from __future__ import annotations

from starlette.requests import Request

from gateway.config import GatewayConfig
from gateway.errors import AuthenticationFailed
from gateway.tenancy import ConcurrencyLimiter, KeyRing, Tenant, bearer_key, tenant_cache_salt

MISSING_KEY = ("You didn't provide an API key. You need to provide your API key in an "
               "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)")
WRONG_KEY = "Incorrect API key provided"


class Access:
    def __init__(self, config: GatewayConfig) -> None:
        self._tenants = KeyRing((digest, tenant) for tenant in config.tenants
                                for digest in tenant.key_digests)
        self._admins = KeyRing((digest, True) for digest in config.admin_key_digests)
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


def _key(request: Request) -> str:
    key = bearer_key(request.headers.get("authorization"))
    if key is None:
        raise AuthenticationFailed(MISSING_KEY)
    return key
