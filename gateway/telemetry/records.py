"""What the gateway saw of one finished completion request, for metrics and the dashboard.

Times are `time.perf_counter()` readings taken in the gateway: `started` when the request
was accepted, `first_token` and `last_token` when the first and the last generated-text chunk
were relayed (streams only), `finished` when the answer was complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from gateway.telemetry.latency import time_per_output_token

# The status a request is counted with when its client left before the answer was complete
# (nginx's "client closed request").
CLIENT_CLOSED_REQUEST = 499


class AdapterType(StrEnum):
    """The `adapter_type` label: what served a request (`BASE`: no adapter, the base model)."""

    BASE = "base"
    LORA = "lora"
    DORA = "dora"


@dataclass(frozen=True)
class RequestRecord:
    tenant: str
    adapter: str
    adapter_type: AdapterType
    started: float
    finished: float
    upstream_seconds: float
    status: int
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Generated-text chunks relayed (a stream's tokens, one per chunk in vLLM's streams): what
    # is known of an aborted stream's output, for which vLLM sends no usage.
    text_chunks: int = 0

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
        return time_per_output_token(self.first_token, self.last_token, self.completion_tokens)
