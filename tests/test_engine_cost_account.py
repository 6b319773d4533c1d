"""The engine cost account without an engine: a step's sums (`step_meter`) and the gateway's
totals over backends (`engine_cost`), checked against sums worked out by hand."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adapters.vllm_plugin.step_meter import StepTotals, is_uniform
from gateway.telemetry.engine_cost import EngineCost, engine_counters

MODELS = {"caps--0011": "caps", "plain--0022": "plain"}


def vllm_text(steps: float, step_tokens: float, adapters: dict[str, tuple]) -> str:
    """vLLM `/metrics` text as the plugin's counters read there (multiprocess mode: no
    `_created` samples), beside one of vLLM's own."""
    lines = ["# HELP vllm:num_requests_running Requests.", "# TYPE vllm:num_requests_running gauge",
             'vllm:num_requests_running{model_name="base"} 0.0',
             "# TYPE dora_engine_step_seconds_total counter",
             f"dora_engine_step_seconds_total {steps}",
             f"dora_engine_step_tokens_total {step_tokens}"]
    for name, (tokens, seconds, dora, uniform, uniform_dora, uniform_base) in adapters.items():
        for counter, value in (("adapter_tokens", tokens), ("adapter_seconds", seconds),
                               ("dora_seconds", dora), ("uniform_adapter_seconds", uniform),
                               ("uniform_dora_seconds", uniform_dora),
                               ("uniform_base_seconds", uniform_base)):
            lines.append(f'dora_engine_{counter}_total{{lora_name="{name}"}} {value}')
    return "\n".join(lines) + "\n"


def exported(cost: EngineCost) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()

    class Collector:
        def collect(self):
            return cost.collect()

    registry.register(Collector())
    return {(sample.name, sample.labels.get("model", "")): sample.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for sample in family.samples}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_step_splits_its_base_work_by_tokens_and_counts_uniform_steps_only():
    totals = StepTotals()
    # 10 tokens in 1.0 s: caps 4 tokens (0.10 s, of which DoRA 0.02), plain 2 (0.05 s)
    totals.close_step(1.0, 10, True, {"caps": (4, 0.10, 0.02), "plain": (2, 0.05, 0.0)})
    totals.close_step(2.0, 5, False, {"caps": (1, 0.30, 0.10)})  # mixed prefill/decode
    taken = totals.take()
    assert (taken.steps, taken.seconds, taken.tokens) == (2, 3.0, 15)
    caps = taken.adapters["caps"]
    assert (caps.tokens, caps.seconds, caps.dora_seconds) == (5, pytest.approx(0.40),
                                                               pytest.approx(0.12))
    assert caps.uniform_seconds == pytest.approx(0.10)
    assert caps.uniform_dora_seconds == pytest.approx(0.02)
    assert caps.uniform_base_seconds == pytest.approx(0.85 * 4 / 10)  # base work 1 - 0.15 s
    assert taken.adapters["plain"].uniform_base_seconds == pytest.approx(0.85 * 2 / 10)
    assert totals.take().steps == 0 and not totals.take().adapters


@pytest.mark.parametrize(("scheduled", "uniform"), [
    ([1, 1, 1], True), ([7, 12], True), ([1, 9], False), ([5], True), ([1], True)])
def test_a_step_is_uniform_when_its_requests_all_decode_or_all_prefill(scheduled, uniform):
    assert is_uniform(scheduled) is uniform


def test_counters_read_from_vllm_text_only_the_plugins():
    text = vllm_text(2.5, 30, {"caps--0011": (12, 0.2, 0.05, 0.1, 0.02, 0.5)})
    assert engine_counters(text) == {
        ("step_seconds", ""): 2.5, ("step_tokens", ""): 30.0,
        ("adapter_tokens", "caps--0011"): 12.0, ("adapter_seconds", "caps--0011"): 0.2,
        ("dora_seconds", "caps--0011"): 0.05, ("uniform_adapter_seconds", "caps--0011"): 0.1,
        ("uniform_dora_seconds", "caps--0011"): 0.02,
        ("uniform_base_seconds", "caps--0011"): 0.5}
    assert engine_counters("vllm:num_requests_running 1\n") == {}


def test_backends_are_summed_a_restart_counts_from_zero_and_unknown_adapters_are_left_out():
    cost = EngineCost(300, lambda: MODELS, clock=Clock())
    cost.update("http://a", engine_counters(vllm_text(
        2.0, 40, {"caps--0011": (10, 0.2, 0.05, 0.2, 0.05, 1.0),
                  "someone-elses": (5, 0.1, 0.0, 0.1, 0.0, 0.5)})))
    cost.update("http://b", engine_counters(vllm_text(
        1.0, 20, {"caps--0011": (4, 0.1, 0.02, 0.1, 0.02, 0.5)})))
    cost.update("http://b", engine_counters(vllm_text(  # b restarted: its step counters fell
        0.5, 8, {"caps--0011": (5, 0.1, 0.03, 0.1, 0.03, 0.5),  # though caps's went up
                 "plain--0022": (3, 0.05, 0.0, 0.05, 0.0, 0.25)})))
    metrics = exported(cost)
    assert metrics[("dora_gateway_engine_step_seconds_total", "")] == pytest.approx(3.5)
    assert metrics[("dora_gateway_engine_tokens_total", "caps")] == 19
    assert metrics[("dora_gateway_engine_tokens_total", "plain")] == 3
    assert metrics[("dora_gateway_engine_tokens_total", "base")] == 68 - 19 - 3 - 5
    assert metrics[("dora_gateway_engine_adapter_seconds_total", "caps")] == pytest.approx(0.4)
    assert metrics[("dora_gateway_engine_dora_seconds_total", "caps")] == pytest.approx(0.1)
    assert metrics[("dora_gateway_engine_adapter_seconds_total", "base")] == 0
    assert not any(model == "someone-elses" for _, model in metrics)
    assert metrics[("dora_gateway_engine_added_cost_ratio", "caps")] == pytest.approx(0.4 / 2.0)
    assert metrics[("dora_gateway_engine_dora_cost_ratio", "caps")] == pytest.approx(0.1 / 2.0)
    assert metrics[("dora_gateway_engine_added_cost_ratio", "plain")] == pytest.approx(0.2)
    assert metrics[("dora_gateway_engine_added_cost_ratio", "base")] == 0


def test_the_ratio_covers_the_window_only():
    clock = Clock()
    cost = EngineCost(60, lambda: MODELS, clock=clock)
    cost.update("http://a", engine_counters(vllm_text(
        1.0, 10, {"caps--0011": (5, 0.5, 0.1, 0.5, 0.1, 0.5)})))  # 100% added
    clock.now += 61
    cost.update("http://a", engine_counters(vllm_text(
        3.0, 30, {"caps--0011": (15, 0.7, 0.1, 0.7, 0.1, 2.5)})))  # since: 0.2 / 2.0
    assert cost.window_ratios()["caps"] == (pytest.approx(0.1), pytest.approx(0.0))
    summary = cost.summary()
    assert summary["caps"] == {"added_cost_pct": pytest.approx(10.0),
                               "dora_cost_pct": pytest.approx(0.0), "tokens": 10}
    assert summary["base"]["added_cost_pct"] == 0
    clock.now += 61
    cost.update("http://a", engine_counters(vllm_text(  # nothing ran: no figure
        3.0, 30, {"caps--0011": (15, 0.7, 0.1, 0.7, 0.1, 2.5)})))
    assert "caps" not in cost.window_ratios()
    assert cost.summary()["caps"]["added_cost_pct"] is None


def test_nothing_is_shown_while_no_engine_measures():
    cost = EngineCost(300, lambda: MODELS, clock=Clock())
    cost.update("http://gpu", engine_counters("vllm:num_requests_running 0\n"))
    assert cost.summary() == {}
    assert not any(name.startswith("dora_gateway_engine") for name, _ in exported(cost))
