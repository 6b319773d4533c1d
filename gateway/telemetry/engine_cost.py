"""The engines' own account of what each adapter costs, summed over the backends.

The DoRA plugin times each adapter's work inside every engine step and publishes counters on
vLLM's `/metrics` (`dora_engine_*`, per vLLM adapter name). The gateway reads them with its
load checks, adds up the increases of every backend (counters that went down belong to a
restarted engine and count from zero), and shows them under the names clients use:

- counters `dora_gateway_engine_adapter_seconds_total{model}` (adapter work, LoRA and DoRA),
  `..._dora_seconds_total{model}` (of which DoRA's scale), `..._tokens_total{model}` (`base`:
  the tokens that ran no adapter) and `dora_gateway_engine_step_seconds_total`;
- the gauge `dora_gateway_engine_added_cost_ratio{model}` over the dashboard's window: the
  adapter's work per token over the base work per token of the same steps, in uniform steps
  only (all decode or all prefill), so a prefill beside a decode does not bias it (0.10: a
  token costs 10% more than with the base model; 0 for `base`), and
  `dora_gateway_engine_dora_cost_ratio{model}`, DoRA's scale's part of it.

A backend whose engine does not measure (another platform, or an older plugin) adds nothing;
the dashboard then shows no figure rather than a zero.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from adapters.engine_metric_names import (
    ADAPTER_LABEL,
    DORA_SECONDS,
    SECONDS,
    STEP_SECONDS,
    STEP_TOKENS,
    TOKENS,
    UNIFORM_BASE_SECONDS,
    UNIFORM_DORA_SECONDS,
    UNIFORM_SECONDS,
)
from adapters.engine_metric_names import PREFIX as ENGINE_PREFIX
from gateway.names import BASE_MODEL
from gateway.telemetry.prometheus import PREFIX

# (counter without prefix and "_total", vLLM adapter name or "" for step-wide counters)
Key = tuple[str, str]


@dataclass(frozen=True)
class _Snapshot:
    at: float
    totals: dict[Key, float]


class EngineCost:
    """Totals over all backends, and their recent history for the windowed ratio.

    `models()`: vLLM adapter name -> the model name clients send, for the adapters the
    gateway serves (the figures of any other adapter are left out).
    """

    def __init__(self, window_s: float, models: Callable[[], Mapping[str, str]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._models = models
        self._clock = clock
        self._last: dict[str, dict[Key, float]] = {}  # per backend: its counters as last read
        self._totals: dict[Key, float] = {}
        self._history = deque([_Snapshot(clock(), {})])  # from nothing counted

    def update(self, backend: str, counters: Mapping[Key, float]) -> None:
        """Fold in a backend's counters as read now (if any went down, the engine restarted:
        all of them count from zero)."""
        last = self._last.get(backend, {})
        if any(value < last.get(key, 0.0) for key, value in counters.items()):
            last = {}
        for key, value in counters.items():
            self._totals[key] = self._totals.get(key, 0.0) + value - last.get(key, 0.0)
        self._last[backend] = dict(counters)
        now = self._clock()
        self._history.append(_Snapshot(now, dict(self._totals)))
        while len(self._history) > 1 and self._history[1].at <= now - self.window_s:
            self._history.popleft()

    def by_model(self, totals: Mapping[Key, float]) -> dict[str, dict[str, float]]:
        """Per model name (`base` included): each counter summed over its vLLM names; empty
        while no engine has reported a timed step."""
        if totals.get((STEP_SECONDS, ""), 0.0) <= 0:
            return {}
        names = self._models()
        adapter_tokens = sum(value for (counter, _), value in totals.items() if counter == TOKENS)
        models = {BASE_MODEL: {TOKENS: max(totals.get((STEP_TOKENS, ""), 0.0) - adapter_tokens,
                                           0.0), SECONDS: 0.0, DORA_SECONDS: 0.0}}
        for (counter, name), value in totals.items():
            if name in names:
                row = models.setdefault(names[name], {})
                row[counter] = row.get(counter, 0.0) + value
        return models

    def _window_ends(self) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        """(now, the window's start), per model."""
        return self.by_model(self._history[-1].totals), self.by_model(self._history[0].totals)

    def window_ratios(self) -> dict[str, tuple[float, float]]:
        """Per model with uniform steps in the window: (added cost, DoRA's part) as ratios."""
        return self._ratios(*self._window_ends())

    def _ratios(self, now: dict[str, dict[str, float]], then: dict[str, dict[str, float]],
                ) -> dict[str, tuple[float, float]]:
        ratios = {BASE_MODEL: (0.0, 0.0)} if now else {}
        for model, row in now.items():
            old = then.get(model, {})
            base = row.get(UNIFORM_BASE_SECONDS, 0.0) - old.get(UNIFORM_BASE_SECONDS, 0.0)
            if model == BASE_MODEL or base <= 0:
                continue
            added = row.get(UNIFORM_SECONDS, 0.0) - old.get(UNIFORM_SECONDS, 0.0)
            dora = row.get(UNIFORM_DORA_SECONDS, 0.0) - old.get(UNIFORM_DORA_SECONDS, 0.0)
            ratios[model] = (added / base, dora / base)
        return ratios

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Per model, for the dashboard: added cost and DoRA's part in percent over the
        window (None without uniform steps of it there), and its tokens in the window."""
        now, then = self._window_ends()
        ratios = self._ratios(now, then)
        rows: dict[str, dict[str, float | None]] = {}
        for model, row in now.items():
            added, dora = ratios.get(model, (None, None))
            rows[model] = {
                "added_cost_pct": None if added is None else added * 100,
                "dora_cost_pct": None if dora is None else dora * 100,
                "tokens": row.get(TOKENS, 0.0) - then.get(model, {}).get(TOKENS, 0.0),
            }
        return rows

    def collect(self) -> Iterable[Metric]:
        """The gateway's engine-cost metrics, as of the last reads (none while no engine
        measures)."""
        models = self.by_model(self._totals)
        if not models:
            return
        for counter, name, documentation in (
                (SECONDS, "adapter_seconds", "Engine time in adapter work (LoRA and DoRA)"),
                (DORA_SECONDS, "dora_seconds", "Of the adapter work, DoRA's scale"),
                (TOKENS, "tokens", "Tokens the engines ran, per model (base: no adapter)")):
            family = CounterMetricFamily(f"{PREFIX}_engine_{name}", documentation,
                                         labels=("model",))
            for model, row in models.items():
                if counter in row:
                    family.add_metric((model,), row[counter])
            yield family
        yield CounterMetricFamily(f"{PREFIX}_engine_step_seconds",
                                  "Engine step time (inputs, forward pass, sampling)",
                                  value=self._totals.get((STEP_SECONDS, ""), 0.0))
        ratios = self.window_ratios()
        for index, name, documentation in (
                (0, "added_cost_ratio", "Adapter work per token over the base work per token "
                 "of the same steps (0.10: 10% more than the base model)"),
                (1, "dora_cost_ratio", "DoRA's scale's part of the added cost ratio")):
            gauge = GaugeMetricFamily(f"{PREFIX}_engine_{name}", documentation,
                                      labels=("model",))
            for model, values in ratios.items():
                gauge.add_metric((model,), values[index])
            yield gauge


def engine_counters(metrics_text: str) -> dict[Key, float]:
    """The plugin's counters in a vLLM's Prometheus text: {(counter, vLLM name): value}."""
    ours = "\n".join(line for line in metrics_text.splitlines()
                     if line.startswith((ENGINE_PREFIX, f"# TYPE {ENGINE_PREFIX}")))
    counters: dict[Key, float] = {}
    for family in text_string_to_metric_families(ours + "\n"):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counter = sample.name[len(ENGINE_PREFIX):-len("_total")]
                counters[(counter, sample.labels.get(ADAPTER_LABEL, ""))] = sample.value
    return counters
