"""What each adapter adds to an engine step, measured where the adapter math runs.

The grouped CPU LoRA op (`cpu_lora`) times each adapter's group in every layer (shrink,
expand and, for DoRA, the scale) into the plan's `AdapterWork`; the model runner's step
(`engine_metrics`) times the whole step and closes it into a `StepTotals`: an account that
depends only on which tokens ran and how long each part took, not on vLLM.

The added cost of adapter a is its work per token over the base work per token of the same
steps. A step's base work (the step minus all adapter work) is shared by its tokens equally,
so a's tokens are given `base * n_a / n` of it:

    added_cost(a) = sum(adapter_seconds[a]) / sum(base_seconds * n_a / n)

summed over the steps in which a ran, counting *uniform* steps only: those whose requests all
decode (one token each) or all prefill (several). A prefill token costs a fraction of a
decode token, so in a step that mixes them an equal share of the base work per token would
make a decoding adapter beside a long prompt look many times dearer than it is (and the
reverse). Uniform steps are most steps in steady traffic (a request prefills once, then
decodes token by token); every step still counts in the plain seconds and tokens.

The figure does not depend on which other requests share the step: the adapter's work is
its own group's, and its share of the base work follows its tokens. It does depend on how
many of the adapter's own tokens share a step, as a group of one token costs nearly what a
group of eight does.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


class AdapterWork:
    """Seconds of adapter work per LoRA slot in the step running now, filled by the op
    (lists indexed by slot: the op adds to them in every layer, so every access counts)."""

    def __init__(self, slots: int) -> None:
        self.seconds = [0.0] * slots
        self.dora_seconds = [0.0] * slots

    def clear(self) -> None:
        slots = len(self.seconds)
        self.seconds[:] = [0.0] * slots
        self.dora_seconds[:] = [0.0] * slots


@dataclass
class AdapterTotals:
    """Sums for one adapter: all steps, and the uniform steps the figure is made of."""

    tokens: int = 0
    seconds: float = 0.0
    dora_seconds: float = 0.0
    uniform_seconds: float = 0.0
    uniform_dora_seconds: float = 0.0
    uniform_base_seconds: float = 0.0  # the base work attributed to its tokens


@dataclass
class StepTotals:
    """Sums over the steps closed so far (since the last `take`)."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    adapters: defaultdict[str, AdapterTotals] = field(
        default_factory=lambda: defaultdict(AdapterTotals))

    def close_step(self, seconds: float, tokens: int, uniform: bool,
                   groups: dict[str, tuple[int, float, float]]) -> None:
        """Add one step of `tokens` tokens that took `seconds`; `groups`: per adapter in it,
        (its tokens, its work seconds, of which DoRA's scale)."""
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        base_seconds = max(seconds - sum(work for _, work, _ in groups.values()), 0.0)
        for name, (count, work, dora) in groups.items():
            totals = self.adapters[name]
            totals.tokens += count
            totals.seconds += work
            totals.dora_seconds += dora
            if uniform:
                totals.uniform_seconds += work
                totals.uniform_dora_seconds += dora
                totals.uniform_base_seconds += base_seconds * count / tokens

    def take(self) -> StepTotals:
        """These sums, leaving this account empty."""
        taken = StepTotals(self.steps, self.seconds, self.tokens, self.adapters)
        self.steps, self.seconds, self.tokens = 0, 0.0, 0
        self.adapters = defaultdict(AdapterTotals)
        return taken


def is_uniform(scheduled_tokens: list[int]) -> bool:
    """Whether a step's requests all decode (one token each) or all prefill (several)."""
    decoding = [count == 1 for count in scheduled_tokens]
    return all(decoding) or not any(decoding)
