"""Which replica a request goes to: adapter affinity under a load bound, or round robin.

Adapter affinity (the default) keeps each adapter on as few replicas as its traffic needs, so
replicas do not fight over their few LoRA slots and adapters are not loaded everywhere. What
is loaded where comes from the gateway's own loads (`Backend.adapters`), never from vLLM's
`vllm:lora_requests_info`, which lists only adapters with requests in flight. A replica's
load is the gateway's requests in flight there plus what vLLM last reported beyond them
(`Backend.load`). The order for an adapter's request, among the replicas under the load
bound `ceil(load_factor * (total load + 1) / replicas)`:

1. replicas that have the adapter loaded, or are loading it (a request for it is there);
2. replicas with a free LoRA slot (fewer adapters in flight there than `max_loras`);
3. the others;

then the replicas over the bound. Within a group the least loaded comes first, then the one
with fewer adapters loaded, then round-robin order. So a hot adapter stays on its replica
until that replica carries more than its share, and then spreads to a second one (loaded
there on demand) instead of queueing. Base-model requests go to the least loaded replica.
The first replica in the order is tried; the others are the failover order.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

AFFINITY = "adapter-affinity"
ROUND_ROBIN = "round-robin"
POLICIES = (AFFINITY, ROUND_ROBIN)
DEFAULT_LOAD_FACTOR = 1.25


class Replica(Protocol):
    """What routing reads of a replica (`pool.Backend` is one): the adapters loaded there,
    those with requests in flight there, and its load."""

    @property
    def adapters(self) -> Collection[str]: ...

    @property
    def active(self) -> Mapping[str, int]: ...

    @property
    def load(self) -> int: ...


R = TypeVar("R", bound=Replica)


@dataclass(frozen=True)
class RoutingPolicy:
    """`max_loras` is the replicas' `--max-loras` (LoRA slots per batch)."""

    kind: str = AFFINITY
    load_factor: float = DEFAULT_LOAD_FACTOR
    max_loras: int = 4

    def order(self, backends: Sequence[R], adapter: str | None, turn: int) -> list[R]:
        """Every backend in `backends`, best first; `turn` rotates the ties (round robin)."""
        if not backends:
            return []
        start = turn % len(backends)
        rotated = [*backends[start:], *backends[:start]]
        if self.kind == ROUND_ROBIN:
            return rotated
        bound = self.load_bound(backends)
        return sorted(rotated, key=lambda backend: (self._group(backend, adapter, bound),
                                                    backend.load, len(backend.adapters)))

    def load_bound(self, backends: Sequence[Replica]) -> int:
        """Replicas at or above this load take no more requests while others are below it."""
        total = sum(backend.load for backend in backends)
        return math.ceil(self.load_factor * (total + 1) / len(backends))

    def _group(self, backend: Replica, adapter: str | None, bound: int) -> int:
        if backend.load >= bound:
            return 3
        if adapter is None or adapter in backend.adapters or adapter in backend.active:
            return 0
        return 1 if len(backend.active) < self.max_loras else 2
