"""Tenants' limits and usage through the gateway's HTTP API, in front of the fake vLLM (the
counters in the gateway's memory or in a real Redis).

What a client sees: 429s in OpenAI's shape with its `x-ratelimit-*` headers, before anything
reaches vLLM; the official `openai` SDK waiting as told and then succeeding; what an admin
sees and sets (`/admin/tenants`, kept in the registry's database) and reads
(`/admin/usage`, JSON and CSV, equal to vLLM's usage fields); and the configured rule when
the counter store is unreachable, in `/health` and `/metrics`.
"""

from __future__ import annotations

import csv
import io

import httpx
import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.engine.process import free_port
from gateway.registry.tenant_limits import TenantLimitsTable
from tests.gateway_fakes import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    STREAM_TEXT,
    USAGE,
    FakeVllm,
    make_gateway,
)

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]


async def make(tmp_path, llama_base, demo, vllm, *, acme: str = "", limits: str = ""):
    return await make_gateway(tmp_path, llama_base, demo, tmp_path / "store", vllm,
                              acme=acme, limits=limits)


async def chat(client: httpx.AsyncClient, model: str = "base", **fields) -> httpx.Response:
    return await client.post(CHAT, json={"model": model, "messages": MESSAGES,
                                         "max_tokens": 8, **fields})


async def test_requests_per_minute_refuses_with_openai_headers_and_nothing_reaches_vllm(
        tmp_path, llama_base, demo, vllm):
    gateway = await make(tmp_path, llama_base, demo, vllm, acme="requests_per_minute = 2")
    async with gateway.client(ACME_KEY) as client:
        answers = [await chat(client) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert [answer.headers["x-ratelimit-remaining-requests"] for answer in answers] == \
        ["1", "0", "0"]
    assert all(answer.headers["x-ratelimit-limit-requests"] == "2" for answer in answers)
    refused = answers[2]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    # One request comes back every 30 s at 2 per minute.
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert 0 < int(refused.headers["retry-after-ms"]) <= 30_000
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert len(vllm.received(CHAT)) == 2
    async with gateway.client(GLOBEX_KEY) as client:  # another tenant, no limits
        other = await chat(client)
    assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers


async def test_tokens_per_minute_counts_the_estimate_and_streams_carry_the_headers(
        tmp_path, llama_base, demo, vllm):
    gateway = await make(tmp_path, llama_base, demo, vllm, acme="tokens_per_minute = 100")
    async with gateway.client(ACME_KEY) as client:
        stream = await chat(client, stream=True, max_tokens=40)
        too_big = await chat(client, max_tokens=64, messages=[
            {"role": "user", "content": "x" * 200}])
    assert stream.status_code == 200
    assert stream.headers["x-ratelimit-limit-tokens"] == "100"
    remaining = int(stream.headers["x-ratelimit-remaining-tokens"])
    assert 40 < 100 - remaining < 60  # 40 output tokens and a few for the prompt
    # 64 + about 50 for the prompt can never fit in 100: no point retrying.
    assert too_big.status_code == 429 and "retry-after" not in too_big.headers
    assert too_big.headers["x-should-retry"] == "false"
    assert "lower max_tokens" in too_big.json()["error"]["message"]


async def test_an_error_after_the_charge_carries_the_headers_and_gives_the_tokens_back(
        tmp_path, llama_base, demo, vllm):
    gateway = await make(tmp_path, llama_base, demo, vllm, acme="tokens_per_minute = 1000")
    vllm.down = True
    async with gateway.client(ACME_KEY) as client:
        failed = await chat(client)
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "backend_unavailable"
    assert failed.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(failed.headers["x-ratelimit-remaining-tokens"]) < 1000
    await gateway.app.state.accounting.quota.settled()
    standing = await gateway.app.state.accounting.quota.standing("acme")
    assert standing["tokens"]["remaining"] == 1000


async def test_a_spent_budget_is_insufficient_quota_until_the_next_period(
        tmp_path, llama_base, demo, vllm):
    gateway = await make(tmp_path, llama_base, demo, vllm,
                         acme="token_budget = 30\nbudget_period = \"month\"")
    async with gateway.client(ACME_KEY) as client:
        first = await chat(client, max_tokens=8)
        await gateway.app.state.accounting.quota.settled()
        answers = [await chat(client, max_tokens=8) for _ in range(4)]
    assert first.status_code == 200
    refused = [answer for answer in answers if answer.status_code == 429]
    assert refused, [answer.status_code for answer in answers]
    error = refused[0].json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert refused[0].headers["x-should-retry"] == "false"
    # The month ends within 31 days.
    assert 0 < int(refused[0].headers["retry-after"]) <= 31 * 86400


async def test_the_openai_sdk_waits_as_the_headers_say_and_then_succeeds(
        tmp_path, llama_base, demo, vllm):
    """20 requests a minute refill one every 3 s. The SDK's own backoff before its first retry
    is under a second, so its single retry succeeds only if it waited as `retry-after-ms`
    said."""
    gateway = await make(tmp_path, llama_base, demo, vllm, acme="requests_per_minute = 20")
    async with gateway.client(ACME_KEY) as client:
        while (await chat(client)).status_code == 200:
            pass
    statuses = []

    async def seen(response: httpx2.Response) -> None:
        statuses.append(response.status_code)

    transport = httpx2.ASGITransport(app=gateway.app)
    sdk = openai.AsyncOpenAI(api_key=ACME_KEY, base_url="http://gateway/v1", max_retries=1,
                             http_client=httpx2.AsyncClient(
                                 transport=transport, event_hooks={"response": [seen]}))
    answer = await sdk.chat.completions.create(model="base", messages=MESSAGES, max_tokens=8)
    assert answer.choices[0].message.content == "Hello there"
    assert statuses == [429, 200]
    with pytest.raises(openai.RateLimitError):  # without retries, the same 429 is raised
        await sdk.with_options(max_retries=0).chat.completions.create(
            model="base", messages=MESSAGES, max_tokens=8)


async def test_an_admin_sets_limits_that_replace_the_config_and_are_kept_in_the_database(
        tmp_path, llama_base, demo, vllm):
    gateway = await make(tmp_path, llama_base, demo, vllm, acme="requests_per_minute = 50")
    async with gateway.client(ADMIN_KEY) as admin, gateway.client(ACME_KEY) as acme:
        assert (await admin.put("/admin/tenants/acme/limits",
                                json={"requests_per_minute": 0})).status_code == 400
        assert (await admin.put("/admin/tenants/acme/limits",
                                json={"requests_per_day": 5})).status_code == 400
        assert (await admin.put("/admin/tenants/nobody/limits", json={})).status_code == 404
        assert (await acme.put("/admin/tenants/acme/limits", json={})).status_code == 401
        put = await admin.put("/admin/tenants/acme/limits",
                              json={"requests_per_minute": 1, "token_budget": 1000})
        assert put.status_code == 200, put.text
        assert put.json()["limits"] == {"requests_per_minute": 1, "tokens_per_minute": None,
                                        "token_budget": 1000, "budget_period": "day"}
        assert [(await chat(acme)).status_code for _ in range(2)] == [200, 429]
        listed = {tenant["name"]: tenant for tenant in
                  (await admin.get("/admin/tenants")).json()["data"]}
        assert listed["acme"]["standing"]["requests"]["remaining"] == 0
        assert listed["acme"]["limits_set_by"].startswith("admin:")
        assert listed["globex"]["limits"]["requests_per_minute"] is None
        stored = TenantLimitsTable(gateway.registry.database.engine).all()
        assert stored["acme"].requests_per_minute == 1 and stored["acme"].token_budget == 1000
        assert (await admin.delete("/admin/tenants/acme/limits")).status_code == 204
        assert TenantLimitsTable(gateway.registry.database.engine).all() == {}
        back = {tenant["name"]: tenant for tenant in
                (await admin.get("/admin/tenants")).json()["data"]}
        assert back["acme"]["limits"]["requests_per_minute"] == 50


async def test_usage_equals_vllms_usage_fields_as_json_and_csv(tmp_path, llama_base, demo, vllm):
    gateway = await make(tmp_path, llama_base, demo, vllm)
    async with gateway.client(GLOBEX_KEY) as client:
        plain = [await chat(client, model="caps") for _ in range(2)]
        streamed = await chat(client, stream=True, stream_options={"include_usage": True})
        vllm.refusal = (400, {"object": "error", "message": "bad", "type": "BadRequestError",
                              "code": 400})
        failed = await chat(client, model="caps")
    assert [answer.status_code for answer in plain] == [200, 200] and failed.status_code == 400
    received = [answer.json()["usage"] for answer in plain]
    streamed_usage = [line for line in streamed.text.splitlines() if '"usage"' in line]
    assert len(streamed_usage) == 1 and f'"completion_tokens":{len(STREAM_TEXT)}' in \
        streamed_usage[0].replace(" ", "")
    async with gateway.client(ADMIN_KEY) as admin:
        rows = (await admin.get("/admin/usage", params={"tenant": "globex"})).json()["data"]
        by_hour = (await admin.get("/admin/usage", params={"group_by": "hour"})).json()
        table = (await admin.get("/admin/usage", params={"format": "csv"})).text
        bad = await admin.get("/admin/usage", params={"group_by": "model"})
        far = await admin.get("/admin/usage", params={"to": "9" * 30})
    assert {(row["tenant"], row["adapter"]): (row["requests"], row["errors"],
                                              row["prompt_tokens"], row["completion_tokens"])
            for row in rows} == {
        ("globex", "base"): (1, 0, USAGE["prompt_tokens"], USAGE["completion_tokens"]),
        ("globex", "caps"): (3, 1, sum(usage["prompt_tokens"] for usage in received),
                             sum(usage["completion_tokens"] for usage in received))}
    assert len(by_hour["data"]) == 1 and by_hour["data"][0]["hour"].endswith(":00:00Z")
    assert by_hour["data"][0]["requests"] == 4
    assert [dict(line) for line in csv.DictReader(io.StringIO(table))] == [
        {key: str(value) for key, value in row.items()} for row in rows]
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_query"
    assert far.status_code == 400 and "between 1970 and 9999" in far.json()["error"]["message"]


async def test_a_request_that_fails_over_to_another_replica_is_counted_once(
        tmp_path, llama_base, demo):
    """The first replica closes the connection with the request on it; the gateway sends it
    to the second. The client got one answer: one request, one usage."""
    first, second = FakeVllm("http://vllm-a:8000"), FakeVllm("http://vllm-b:8000")
    first.drops_completions = True
    gateway = await make_gateway(tmp_path, llama_base, demo, tmp_path / "store", first,
                                 second)
    async with gateway.client(ACME_KEY) as client:
        answers = [await chat(client, model="caps") for _ in range(2)]
    assert [answer.status_code for answer in answers] == [200, 200]
    assert first.received(CHAT), "no request failed over"
    async with gateway.client(ADMIN_KEY) as admin:
        rows = (await admin.get("/admin/usage", params={"tenant": "acme"})).json()["data"]
    assert [(row["adapter"], row["requests"], row["total_tokens"]) for row in rows] == [
        ("caps", 2, sum(answer.json()["usage"]["total_tokens"] for answer in answers))]


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_an_unreachable_counter_store_follows_the_configured_rule(
        tmp_path, llama_base, demo, vllm, fail):
    store = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    gateway = await make(tmp_path, llama_base, demo, vllm, acme="requests_per_minute = 1",
                         limits=f'[limits]\nstore = "{store}"\nfail = "{fail}"')
    async with gateway.client(ACME_KEY) as acme, gateway.client(GLOBEX_KEY) as globex:
        answers = [await chat(acme) for _ in range(2)]
        unlimited_tenant = await chat(globex)
        health = await acme.get("/health")
        metrics = (await acme.get("/metrics")).text
    assert unlimited_tenant.status_code == 200
    assert health.json()["limits"] == {"store": store, "reachable": False, "fail": fail}
    assert scraped(metrics, "dora_gateway_limit_store_up") == 0
    if fail == "open":
        assert [answer.status_code for answer in answers] == [200, 200]
        assert health.status_code == 200
        assert scraped(metrics, "dora_gateway_limit_store_unreachable_requests_total",
                       outcome="allowed") == 2
    else:
        assert [answer.status_code for answer in answers] == [503, 503]
        assert answers[0].json()["error"]["code"] == "limits_unavailable"
        assert health.status_code == 503
        assert len(vllm.received(CHAT)) == 1  # globex's


async def test_refusals_are_counted_per_tenant_and_limit(tmp_path, llama_base, demo, vllm,
                                                         redis_server):
    redis_server.flush()
    gateway = await make(tmp_path, llama_base, demo, vllm, acme="requests_per_minute = 1",
                         limits=f'[limits]\nstore = "{redis_server.url}"')
    async with gateway.client(ACME_KEY) as acme:
        statuses = [(await chat(acme)).status_code for _ in range(3)]
        metrics = (await acme.get("/metrics")).text
    assert statuses == [200, 429, 429]
    assert scraped(metrics, "dora_gateway_rate_limited_requests_total", tenant="acme",
                   limit="requests") == 2
    assert scraped(metrics, "dora_gateway_limit_store_up") == 1


def scraped(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value
                                           for key, value in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} is not in the metrics")
