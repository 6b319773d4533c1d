"""The adapter registry: the in-process copy requests read (`adapter_registry.py`), the
durable registry in SQLite or PostgreSQL (`database.py`, its tables in `schema.py`), and the
loop that keeps replicas converged (`sync.py`)."""

from gateway.registry.adapter_registry import AdapterRegistry, RegistryObserver
from gateway.registry.database import RegistryDatabase
from gateway.registry.entries import AdapterEntry, Origin, check_name

__all__ = ["AdapterEntry", "AdapterRegistry", "Origin", "RegistryDatabase", "RegistryObserver",
           "check_name"]
