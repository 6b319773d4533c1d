"""The definitions behind every latency figure, in one place: the gateway's meter (metrics and
dashboard), `dora-gateway bench` and the engine benchmarks all use them, so their figures
agree by construction.

- A generated-text chunk: a streamed chunk with a choice that carries generated text (a
  completions choice's `text`; a chat delta's content, reasoning or tool calls), or a
  Responses API delta event of text, reasoning or tool-call arguments.
- Time to first token: from the request to the first generated-text chunk.
- Time per output token (TPOT): from the first generated-text chunk to the last, divided by
  the output tokens after the first (vLLM's usage count; one chunk may carry several tokens).
- Percentiles: nearest rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

GENERATED_DELTA_FIELDS = ("content", "reasoning", "reasoning_content", "tool_calls")
GENERATED_RESPONSE_EVENTS = frozenset({
    "response.output_text.delta", "response.reasoning_text.delta",
    "response.function_call_arguments.delta"})


def carries_generated_text(chunk: object) -> bool:
    """Whether a parsed stream chunk is a generated-text chunk (a role-only or usage-only chunk
    is not)."""
    if not isinstance(chunk, dict):
        return False
    if chunk.get("type") in GENERATED_RESPONSE_EVENTS:
        return bool(chunk.get("delta"))
    return any(_choice_carries_text(choice) for choice in chunk.get("choices") or ())


def time_per_output_token(first: float | None, last: float | None,
                          output_tokens: int | None) -> float | None:
    """(last - first) / (output_tokens - 1), in the clock's unit; None below two tokens."""
    if first is None or last is None or not output_tokens or output_tokens < 2:
        return None
    return (last - first) / (output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank: always a value that was observed, so p95 of few samples is the slowest
    rather than an interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def _choice_carries_text(choice: object) -> bool:
    if not isinstance(choice, dict):
        return False
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return any(delta.get(key) for key in GENERATED_DELTA_FIELDS)
    return bool(choice.get("text"))
