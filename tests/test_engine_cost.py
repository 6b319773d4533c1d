"""The engine's own account of adapter cost, from a real vLLM through the real gateway.

The session's vLLM (two LoRA slots) and gateway serve mixed loads: the base model, two DoRA
adapters and a LoRA adapter at once. What vLLM's `/metrics` says must add up against the
usage the clients were sent: every token a step ran is a prompt token, or a generated token
fed back (all but the last of each answer). Prompts are unique and shorter than a KV-cache
block, so no prompt token is served from the prefix cache.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.engine_metric_names import (
    SECONDS,
    STEP_SECONDS,
    STEP_TOKENS,
    TOKENS,
    UNIFORM_BASE_SECONDS,
)
from gateway.telemetry.engine_cost import engine_counters
from tests.engine import load_adapter, unload_adapter
from tests.gateway_process import GLOBEX_KEY, GatewayProcess, poll_until

pytestmark = pytest.mark.vllm
MIXED = ("base", "caps", "pirate", "caps-lora")  # base, two DoRA adapters, a LoRA adapter
MAX_TOKENS = 12
_serial = itertools.count()


def engine_totals(engine_url: str) -> dict[tuple[str, str], float]:
    return engine_counters(httpx.get(engine_url + "/metrics", timeout=30).text)


def gateway_engine_metrics(gateway: GatewayProcess) -> dict[tuple[str, str], float]:
    """The gateway's `dora_gateway_engine_*` samples: {(sample name, model): value}."""
    text = httpx.get(gateway.url + "/metrics", timeout=30).text
    return {(sample.name, sample.labels.get("model", "")): sample.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("dora_gateway_engine_") for sample in family.samples}


def delta(after: dict, before: dict, key: tuple[str, str]) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


async def send_load(gateway: GatewayProcess, models: tuple[str, ...], rounds: int,
                    ) -> dict[str, int]:
    """`rounds` rounds of one completion per model, all of a round at once; per model, the
    tokens the engine must have run for them: prompt + completion - 1 per answer."""
    tokens: dict[str, int] = defaultdict(int)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=300,
                                 headers={"Authorization": f"Bearer {GLOBEX_KEY}"}) as client:
        for _ in range(rounds):
            answers = await asyncio.gather(*(client.post("/v1/completions", json={
                "model": model, "prompt": f"{next(_serial)} seas and ships",
                "max_tokens": MAX_TOKENS, "temperature": 0}) for model in models))
            for model, answer in zip(models, answers, strict=True):
                assert answer.status_code == 200, answer.text
                usage = answer.json()["usage"]
                tokens[model] += usage["prompt_tokens"] + usage["completion_tokens"] - 1
    return dict(tokens)


def settled(engine_url: str, gateway: GatewayProcess, at_least_tokens: float = 0,
            ) -> tuple[dict, dict]:
    """(vLLM's counters, the gateway's engine metrics) once vLLM has counted at least
    `at_least_tokens` step tokens and the gateway's health checks have read all of them."""
    latest: dict = {}

    def caught_up() -> bool:
        latest["engine"] = engine_totals(engine_url)
        latest["gateway"] = gateway_engine_metrics(gateway)
        engine_seconds = latest["engine"].get((STEP_SECONDS, ""), 0.0)
        gateway_seconds = latest["gateway"].get(("dora_gateway_engine_step_seconds_total", ""),
                                                0.0)
        return (latest["engine"].get((STEP_TOKENS, ""), 0.0) >= at_least_tokens
                and gateway_seconds == pytest.approx(engine_seconds, rel=1e-9, abs=1e-12))

    poll_until(caught_up, f"the gateway never caught up with vLLM's counters: {latest}",
               timeout_s=120)
    return latest["engine"], latest["gateway"]


def test_mixed_load_counters_add_up_per_adapter(engine, real_gateway, random_dora_adapters):
    idle = "engine-cost-idle"  # loaded in the engine, never requested
    assert load_adapter(engine.base_url, idle, random_dora_adapters[0]).status_code == 200
    try:
        engine_before, gateway_before = settled(engine.base_url, real_gateway)
        expected = asyncio.run(send_load(real_gateway, MIXED, rounds=3))
        engine_after, gateway_after = settled(
            engine.base_url, real_gateway,
            engine_before.get((STEP_TOKENS, ""), 0) + sum(expected.values()))
    finally:
        unload_adapter(engine.base_url, idle)

    for model, count in expected.items():  # exactly: nothing else ran meanwhile
        assert delta(gateway_after, gateway_before,
                     ("dora_gateway_engine_tokens_total", model)) == count, model
    step_tokens = delta(engine_after, engine_before, (STEP_TOKENS, ""))
    assert step_tokens == sum(expected.values())
    adapter_tokens = sum(delta(engine_after, engine_before, key) for key in engine_after
                         if key[0] == TOKENS)
    assert adapter_tokens + expected["base"] == step_tokens
    adapter_seconds = sum(delta(engine_after, engine_before, key) for key in engine_after
                          if key[0] == SECONDS)
    assert 0 < adapter_seconds < delta(engine_after, engine_before, (STEP_SECONDS, ""))
    assert not any(name == idle for _, name in engine_after)
    for model in ("caps", "pirate", "caps-lora"):
        work = delta(gateway_after, gateway_before,
                     ("dora_gateway_engine_adapter_seconds_total", model))
        dora = delta(gateway_after, gateway_before,
                     ("dora_gateway_engine_dora_seconds_total", model))
        assert work > 0
        assert (0 < dora < work) if model != "caps-lora" else dora == 0
        assert gateway_after[("dora_gateway_engine_added_cost_ratio", model)] > 0
    assert gateway_after[("dora_gateway_engine_added_cost_ratio", "base")] == 0
    assert gateway_after[("dora_gateway_engine_dora_cost_ratio", "caps-lora")] == 0


def test_base_only_load_shows_no_adapter_work(engine, real_gateway):
    engine_before, _ = settled(engine.base_url, real_gateway)
    expected = asyncio.run(send_load(real_gateway, ("base", "base"), rounds=2))
    engine_after, _ = settled(engine.base_url, real_gateway,
                              engine_before.get((STEP_TOKENS, ""), 0) + expected["base"])
    assert delta(engine_after, engine_before, (STEP_TOKENS, "")) == expected["base"]
    for key in engine_after:
        if key[0] in (TOKENS, SECONDS, UNIFORM_BASE_SECONDS):
            assert delta(engine_after, engine_before, key) == 0, key
