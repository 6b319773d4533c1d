"""Soak: a real gateway process in front of the session's vLLM under minutes of mixed traffic.

Workers send, at once and for `DORA_GATEWAY_SOAK_SECONDS` (90 by default; as long as you like
by the variable): completions and chats, streamed or not, on the base model and adapters;
streams and plain requests the client abandons midway; requests that must fail (bad JSON,
hostile bodies, unknown models, wrong keys, values vLLM refuses, more than a tenant's limit);
and admin changes (an adapter added and removed, over and over). Every request must end with
an answer (errors in OpenAI's shape) or a stream that ends with `[DONE]`, unless the client
left it; the gateway's RSS and open file descriptors must stay flat once warm; afterwards the
in-flight gauges and vLLM's running requests are back to zero. The figures are written to
`test-output/soak.json` (docs/benchmarks.md quotes them).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from gateway.errors import ERROR_TYPES
from tests.conftest import TEST_OUTPUT
from tests.gateway_process import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    PROMPT,
    GatewayProcess,
    poll_until,
    running_requests,
    write_config,
)
from tests.test_engine_gateway_overload import in_flight

pytestmark = pytest.mark.vllm
SOAK_S = float(os.environ.get("DORA_GATEWAY_SOAK_SECONDS", "90"))
WORKERS = 6
WARM_UP_FRACTION = 0.25
# Growth allowed once warm: the gateway keeps bounded windows of recent requests (dashboard).
RSS_GROWTH_BYTES = 48 << 20
FD_SLACK = 8
MESSAGES = [{"role": "user", "content": "Name a sea."}]


@dataclass
class Tally:
    """How each request ended, by kind; `lost` holds the ones that ended without an answer."""

    outcomes: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def gateway(engine, default_model, demo_adapters, tmp_path_factory) -> Iterator[GatewayProcess]:
    config = write_config(tmp_path_factory.mktemp("soak") / "gateway.toml",
                          model=default_model, adapters_dir=demo_adapters, roots=[],
                          backends=[engine.base_url], server="stream_write_timeout_seconds = 5")
    gateway = GatewayProcess.start(config, TEST_OUTPUT / "gateway-soak.log")
    yield gateway
    gateway.stop()


def check_error(response: httpx.Response, kind: str, tally: Tally) -> None:
    error = response.json().get("error") if response.content else None
    if not isinstance(error, dict) or error.get("type") not in ERROR_TYPES or not (
            error.get("code") is None or isinstance(error.get("code"), str)):
        tally.lost.append(f"{kind}: {response.status_code} not in OpenAI's shape: "
                          f"{response.text[:200]}")


async def plain(client: httpx.AsyncClient, kind: str, tally: Tally, path: str, body: object,
                key: str, expect: int) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post(path, content=content,
                                 headers={"Authorization": f"Bearer {key}",
                                          "Content-Type": "application/json"})
    tally.outcomes[(kind, response.status_code)] += 1
    if response.status_code >= 400:
        check_error(response, kind, tally)
    if response.status_code not in (expect, 429):
        tally.lost.append(f"{kind}: {response.status_code} {response.text[:200]}")


async def streamed(client: httpx.AsyncClient, kind: str, tally: Tally, body: dict, key: str,
                   *, leave_after: int | None = None) -> None:
    """A stream read to its end (which must be `[DONE]`), or left after `leave_after` events."""
    events = []
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                             headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            await response.aread()
            tally.outcomes[(kind, response.status_code)] += 1
            check_error(response, kind, tally)
            if response.status_code != 429:
                tally.lost.append(f"{kind}: {response.status_code} {response.text[:200]}")
            return
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
                if leave_after is not None and len(events) >= leave_after:
                    tally.outcomes[(kind, "left")] += 1
                    return
    tally.outcomes[(kind, 200)] += 1
    if not events or events[-1] != "[DONE]":
        tally.lost.append(f"{kind}: the stream ended without [DONE]: {events[-2:]}")


async def abandoned(client: httpx.AsyncClient, tally: Tally) -> None:
    """A plain request the client gives up on before the answer."""
    try:
        await client.post("/v1/completions", timeout=0.3, headers={
            "Authorization": f"Bearer {GLOBEX_KEY}"}, json={
            "model": "pirate", "prompt": PROMPT, "max_tokens": 64, "ignore_eos": True})
        tally.outcomes[("abandoned", "answered first")] += 1
    except httpx.TimeoutException:
        tally.outcomes[("abandoned", "left")] += 1


async def admin_change(client: httpx.AsyncClient, tally: Tally, serial: int) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    name = f"soak-{serial}"
    added = await client.post("/admin/adapters", json={"name": name, "path": "caps"},
                              headers=headers)
    tally.outcomes[("admin add", added.status_code)] += 1
    if added.status_code != 201:
        tally.lost.append(f"admin add: {added.status_code} {added.text[:200]}")
        return
    used = await client.post("/v1/chat/completions", headers={
        "Authorization": f"Bearer {GLOBEX_KEY}"}, json={
        "model": name, "messages": MESSAGES, "max_tokens": 4})
    tally.outcomes[("admin use", used.status_code)] += 1
    removed = await client.delete(f"/admin/adapters/{name}", headers=headers)
    tally.outcomes[("admin remove", removed.status_code)] += 1
    if used.status_code not in (200, 429) or removed.status_code != 204:
        tally.lost.append(f"admin: use {used.status_code} {used.text[:200]}, "
                          f"remove {removed.status_code}")


def one_request(client: httpx.AsyncClient, tally: Tally, rng: random.Random, serial: int):
    """One request of the mix (a coroutine)."""
    model = rng.choice(["base", "caps", "pirate", "caps-lora", "brief"])
    key = rng.choice([ACME_KEY, GLOBEX_KEY])
    if key == ACME_KEY and model not in ("base", "caps", "pirate"):
        key = GLOBEX_KEY
    chat = {"model": model, "messages": MESSAGES, "max_tokens": rng.randint(1, 12)}
    choices = [
        lambda: plain(client, "chat", tally, "/v1/chat/completions", chat, key, 200),
        lambda: plain(client, "completion", tally, "/v1/completions",
                      {"model": model, "prompt": PROMPT, "max_tokens": 6}, key, 200),
        lambda: streamed(client, "stream", tally, chat, key),
        lambda: streamed(client, "stream left", tally, {**chat, "max_tokens": 64}, key,
                         leave_after=2),
        lambda: abandoned(client, tally),
        lambda: plain(client, "bad json", tally, "/v1/chat/completions", b'{"model": "base",',
                      key, 400),
        lambda: plain(client, "hostile", tally, "/v1/chat/completions",
                      b'{"model": "base", "messages": [{"role": "user", "content": "\\ud800"}]}',
                      key, 400),
        lambda: plain(client, "unknown model", tally, "/v1/chat/completions",
                      {**chat, "model": "no-such-adapter"}, key, 404),
        lambda: plain(client, "wrong key", tally, "/v1/chat/completions", chat,
                      "sk-wrong-0123456789abcdef", 401),
        lambda: plain(client, "vllm refuses", tally, "/v1/chat/completions",
                      {**chat, "max_tokens": 0}, key, 400),
    ]
    if serial % 25 == 0:
        return admin_change(client, tally, serial)
    return rng.choice(choices)()


async def traffic(gateway: GatewayProcess, until: float, tally: Tally) -> None:
    serials = itertools.count()
    limits = httpx.Limits(max_connections=WORKERS * 2)

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=120, limits=limits) as client:
            while time.monotonic() < until:
                request = one_request(client, tally, rng, next(serials))
                try:
                    await request
                except httpx.HTTPError as exc:
                    tally.lost.append(f"transport error: {exc!r}")

    await asyncio.gather(*(worker(seed) for seed in range(WORKERS)))


async def sample(process: psutil.Process, until: float, samples: list[tuple[float, int, int]],
                 ) -> None:
    start = time.monotonic()
    while time.monotonic() < until:
        samples.append((time.monotonic() - start, process.memory_info().rss, process.num_fds()))
        await asyncio.sleep(2)


def test_soak_mixed_traffic_loses_nothing_and_stays_flat(gateway, engine):
    process = psutil.Process(gateway.process.pid)
    fds_before = process.num_fds()
    tally, samples = Tally(), []

    async def run() -> None:
        until = time.monotonic() + SOAK_S
        await asyncio.gather(traffic(gateway, until, tally), sample(process, until, samples))

    asyncio.run(run())
    poll_until(lambda: in_flight(gateway) == 0, "the gateway still counts requests in flight",
               300)
    poll_until(lambda: running_requests(engine.base_url) == 0, "vLLM still runs requests", 300)
    fds_after = process.num_fds()
    warm = [sample for sample in samples if sample[0] >= SOAK_S * WARM_UP_FRACTION]
    figures = {"seconds": SOAK_S, "workers": WORKERS,
               "requests": sum(tally.outcomes.values()),
               "outcomes": {f"{kind} {status}": count
                            for (kind, status), count in sorted(tally.outcomes.items(),
                                                                key=str)},
               "rss_mib": {"start": samples[0][1] / 2**20, "warm": warm[0][1] / 2**20,
                           "end": samples[-1][1] / 2**20,
                           "max": max(sample[1] for sample in samples) / 2**20},
               "fds": {"before": fds_before, "max": max(sample[2] for sample in samples),
                       "after": fds_after},
               "lost": tally.lost}
    TEST_OUTPUT.mkdir(exist_ok=True)
    (TEST_OUTPUT / "soak.json").write_text(json.dumps(figures, indent=2))
    assert tally.lost == []
    assert sum(count for (kind, status), count in tally.outcomes.items() if status == 200) > 0
    assert max(sample[1] for sample in warm) - warm[0][1] < RSS_GROWTH_BYTES, figures["rss_mib"]
    assert fds_after <= fds_before + FD_SLACK, figures["fds"]
