"""Keeping a replica's registry converged with the shared database, by polling.

Each round reads one row (`registry_generation`); only when it moved is the whole registry
read and applied. Polling works the same over SQLite and PostgreSQL, needs no connection held
open, and cannot miss a change made while the database was unreachable: the first round that
reaches it again catches up.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.exc import DBAPIError

from gateway.errors import RegistryUnavailable
from gateway.registry.adapter_registry import AdapterRegistry
from gateway.registry.database import reason

POLL_INTERVAL_S = 1.0

log = logging.getLogger(__name__)


async def follow(registry: AdapterRegistry, interval_s: float = POLL_INTERVAL_S) -> None:
    """Catch up with the database every `interval_s` until cancelled; an unreachable
    database is logged once when it goes and once when it is back."""
    reachable = True
    while True:
        await asyncio.sleep(interval_s)
        try:
            await registry.catch_up()
        except RegistryUnavailable as exc:
            if reachable:
                log.warning("the registry database is unreachable (%s): serving the adapters "
                            "known so far; admin changes answer 503 until it is back",
                            reason(exc.__cause__) if isinstance(exc.__cause__, DBAPIError)
                            else exc)
            reachable = False
            continue
        except Exception:
            log.exception("syncing the registry failed")
            continue
        if not reachable:
            log.info("the registry database is reachable again; caught up")
        reachable = True
