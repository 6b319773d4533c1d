"""`/metrics`, `/dashboard/data` and the stream usage handling, against the fake vLLM.

Series are read back by parsing the exposition text with prometheus-client's own parser, as
a Prometheus server would.
"""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway_fakes import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    STREAM_CHUNKS,
    STREAM_TEXT,
    USAGE,
    make_gateway,
)

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
METRICS_KEY = "sk-metrics-0123456789abcdef"


async def scrape(gateway) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    async with gateway.client() as client:
        response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def series(samples: dict, name: str, **labels: str) -> float:
    matches = [value for (sample, sample_labels), value in samples.items()
               if sample == name and set(labels.items()) <= set(sample_labels)]
    assert len(matches) == 1, f"{name} {labels}: {matches}"
    return matches[0]


def absent(samples: dict, name: str, **labels: str) -> bool:
    return not any(sample == name and set(labels.items()) <= set(sample_labels)
                   for sample, sample_labels in samples)


async def stream_chat(gateway, key: str, model: str, **extra) -> list[dict]:
    async with gateway.client(key) as client:
        response = await client.post(CHAT, json={"model": model, "messages": MESSAGES,
                                                 "stream": True, **extra})
    assert response.status_code == 200, response.text
    events = [line[len("data: "):] for line in response.text.split("\n") if line]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


async def test_a_stream_is_timed_and_counted_by_tenant_adapter_and_type(gateway):
    await stream_chat(gateway, ACME_KEY, "caps")
    samples = await scrape(gateway)
    labels = {"tenant": "acme", "adapter": "caps", "adapter_type": "dora"}
    assert series(samples, "dora_gateway_requests_total", status="200", **labels) == 1
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds",
                      "request_duration_seconds", "upstream_duration_seconds"):
        assert series(samples, f"dora_gateway_{histogram}_count", **labels) == 1
    assert series(samples, "dora_gateway_completion_tokens_total", **labels) == len(STREAM_TEXT)
    assert series(samples, "dora_gateway_prompt_tokens_total", **labels) == USAGE["prompt_tokens"]


async def test_the_gateway_asks_for_usage_and_hides_it_from_clients_that_did_not(gateway, vllm):
    chunks = await stream_chat(gateway, GLOBEX_KEY, "plain")
    assert vllm.received(CHAT)[-1]["stream_options"] == {"include_usage": True}
    assert len(chunks) == STREAM_CHUNKS
    assert all("usage" not in chunk and chunk["choices"] for chunk in chunks)

    chunks = await stream_chat(gateway, GLOBEX_KEY, "plain",
                               stream_options={"include_usage": True})
    assert chunks[-1]["usage"] == USAGE and chunks[-1]["choices"] == []
    samples = await scrape(gateway)
    assert series(samples, "dora_gateway_completion_tokens_total", tenant="globex",
                  adapter="plain", adapter_type="lora") == 2 * len(STREAM_TEXT)


async def test_a_non_streamed_request_has_no_first_token_time(gateway):
    async with gateway.client(GLOBEX_KEY) as client:
        response = await client.post(CHAT, json={"model": "base", "messages": MESSAGES})
    assert "usage" in response.json()
    samples = await scrape(gateway)
    labels = {"tenant": "globex", "adapter": "base", "adapter_type": "base"}
    assert series(samples, "dora_gateway_request_duration_seconds_count", **labels) == 1
    assert absent(samples, "dora_gateway_time_to_first_token_seconds_count", **labels)
    assert series(samples, "dora_gateway_completion_tokens_total", **labels) == len(STREAM_TEXT)


async def test_refusals_are_counted_by_status_and_unknown_models_never_become_labels(
        gateway, vllm):
    async with gateway.client(ACME_KEY) as client:
        too_many = await client.post(CHAT, json={"model": "caps", "messages": MESSAGES,
                                                 "max_tokens": 10_000})
        unknown = await client.post(CHAT, json={"model": "no-such-<adapter>",
                                                "messages": MESSAGES})
    assert (too_many.status_code, unknown.status_code) == (400, 404)
    vllm.down = True
    async with gateway.client(ACME_KEY) as client:
        down = await client.post(CHAT, json={"model": "base", "messages": MESSAGES})
    assert down.status_code == 503
    samples = await scrape(gateway)
    assert series(samples, "dora_gateway_requests_total", adapter="caps", status="400") == 1
    assert series(samples, "dora_gateway_requests_total", adapter="base", status="503") == 1
    assert not any("no-such" in str(labels) for _, labels in samples)
    assert series(samples, "dora_gateway_backend_up", backend=vllm.url) == 0


@pytest.mark.parametrize(("failure", "status"), [
    (httpx.ReadError("connection reset"), "502"), (httpx.ReadTimeout("timed out"), "504")])
async def test_a_broken_stream_is_counted_with_its_failure_status(gateway, vllm, failure,
                                                                  status):
    vllm.stream_error = failure
    async with gateway.client(ACME_KEY) as client:
        await client.post(CHAT, json={"model": "base", "messages": MESSAGES, "stream": True})
    samples = await scrape(gateway)
    assert series(samples, "dora_gateway_requests_total", adapter="base", status=status) == 1
    assert absent(samples, "dora_gateway_time_to_first_token_seconds_count", adapter="base")


async def test_live_gauges_and_adapter_times(gateway, vllm):
    await stream_chat(gateway, ACME_KEY, "caps")
    samples = await scrape(gateway)
    assert series(samples, "dora_gateway_backend_up", backend=vllm.url) == 1
    assert series(samples, "dora_gateway_requests_in_flight", tenant="acme") == 0
    assert series(samples, "dora_gateway_adapters", adapter_type="dora") == 2
    assert series(samples, "dora_gateway_adapters", adapter_type="lora") == 1
    assert series(samples, "dora_gateway_adapter_compile_seconds_count",
                  adapter_type="dora") == 2
    assert series(samples, "dora_gateway_adapter_load_seconds_count", adapter_type="dora") == 1


async def test_dashboard_data_summarises_the_window_per_adapter(gateway):
    for model in ("base", "base", "caps"):
        await stream_chat(gateway, GLOBEX_KEY, model)
    async with gateway.client() as client:
        data = (await client.get("/dashboard/data")).json()
    rows = {row["adapter"]: row for row in data["adapters"]}
    assert [row["adapter"] for row in data["adapters"]] == ["base", "caps"]
    assert rows["base"]["requests"] == 2 and rows["caps"]["type"] == "dora"
    assert rows["caps"]["tpot_p50_ms"] > 0 and rows["caps"]["ttft_p95_ms"] > 0
    expected = (rows["caps"]["tpot_p50_ms"] / rows["base"]["tpot_p50_ms"] - 1) * 100
    assert rows["caps"]["tpot_overhead_pct"] == pytest.approx(expected)
    assert rows["base"]["tpot_overhead_pct"] == 0


@pytest.mark.parametrize("path", ["/metrics", "/dashboard/data"])
async def test_loopback_reads_freely_and_others_need_a_metrics_or_admin_key(gateway, path):
    async with gateway.client(client_host="10.1.2.3") as client:
        assert (await client.get(path)).status_code == 401
    for key, status in ((ACME_KEY, 401), (ADMIN_KEY, 200)):
        async with gateway.client(key, client_host="10.1.2.3") as client:
            assert (await client.get(path)).status_code == status


async def test_access_key_asks_everyone_and_accepts_metrics_keys(
        tmp_path, llama_base, demo, store_dir, vllm):
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, vllm, metrics=f"""
[metrics]
access = "key"
api_keys = ["{METRICS_KEY}"]
""")
    async with gateway.client() as client:
        response = await client.get("/metrics")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    async with gateway.client(METRICS_KEY) as client:
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/dashboard")).status_code == 200
    await gateway.pool.aclose()


async def test_metrics_are_the_gateways_own_not_vllms(gateway, vllm):
    samples = await scrape(gateway)
    assert samples and all(name.startswith("dora_gateway_") for name, _ in samples)
    assert vllm.received("/metrics") == []
