"""Usage accounting: requests and tokens per tenant, adapter and hour, durable and queryable."""

from gateway.usage.ledger import UsageLedger

__all__ = ["UsageLedger"]
