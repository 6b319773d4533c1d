"""What the gateway saw of one finished completion request, for metrics and the dashboard.

Times are `time.perf_counter()` readings taken in the gateway: `started` when the request
was accepted, `first_token` when the first chunk carrying generated text was relayed
(streams only), `finished` when the answer was complete.
"""

from __future__ import annotations

from dataclasses import dataclass

BASE = "base"
LORA = "lora"
DORA = "dora"
ADAPTER_TYPES = (BASE, LORA, DORA)


@dataclass(frozen=True)
class RequestRecord:
    tenant: str
    adapter: str
    adapter_type: str
    started: float
    finished: float
    upstream_seconds: float
    status: int
    first_token: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def e2e_seconds(self) -> float:
        return self.finished - self.started

    @property
    def ttft_seconds(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def tpot_seconds(self) -> float | None:
        """Time per output token after the first: (finished - first_token) / (tokens - 1)."""
        if self.first_token is None or not self.completion_tokens or self.completion_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.completion_tokens - 1)
