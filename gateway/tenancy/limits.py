"""Per-tenant concurrency limits: requests in flight at once."""

from __future__ import annotations

from gateway.errors import RateLimited


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
