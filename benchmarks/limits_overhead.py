"""Benchmark: what the per-tenant limit checks add to a request, and to a gateway's throughput.

    python -m benchmarks.limits_overhead [--requests 4000] [--seconds 3] [--rounds 8]
        [--concurrency 16] [--admit-calls 5000] [--stores redis memory] [--pin]

The gateway's own cost is measured, not vLLM's: its one backend is a stub HTTP server (a
subprocess, raw asyncio) that answers `/v1/completions` at once with a `usage` object, and
`/health`, `/v1/models` and `/metrics` as vLLM does. One real `dora-gateway serve` in front of
it has two tenants: `limited` (requests and tokens per minute and a daily token budget, all so
high they never refuse) and `unlimited` (no limits). For each counter store (`redis`: a real
`redis-server` on a free port, `[limits] store`; `memory`: no store, this process's counters),
one gateway is started and measured:

1. added latency: end-to-end latency of sequential non-streamed requests (concurrency 1),
   `limited` and `unlimited` alternating request by request (who goes first alternates too),
   `--requests` each; p50 and p99 of each, and their differences.
2. throughput: requests per second at `--concurrency` for `--seconds`, `limited` and
   `unlimited` alternating in `--rounds` rounds (who goes first alternates); the ratio
   limited / unlimited over all rounds.

And in this process, against the same Redis (and the memory counters): `Quota.admit` alone
(the round trip on the request path), `Quota.settle` (what it costs the request path: it only
schedules the adjustment) and the adjustment itself (run in the background), `--admit-calls`
each, p50 and p99.

`--pin` runs the gateway alone on CPU 1 and everything else (the client, the stub, Redis) on
CPU 0, so throughput is one gateway's (one event loop's) capacity rather than a share of the
cores it would otherwise contend for with the load generator and Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import aiohttp
import uvloop

from adapters import paths
from gateway.engine.process import free_port, wait_until_ok
from gateway.quota.counters import Counters, MemoryCounters
from gateway.quota.guard import Quota
from gateway.quota.policy import TenantLimits
from gateway.quota.redis_counters import RedisCounters
from gateway.telemetry.latency import percentile
from gateway.telemetry.records import AdapterType, RequestRecord
from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer

GATEWAY_CPU, OTHERS_CPU = 1, 0
TENANTS = ("limited", "unlimited")
KEYS = {"limited": "sk-limited-0123456789abcdef", "unlimited": "sk-unlimited-0123456789abcdef"}
# So high that they never refuse in a run: the check's full path (three rules) is taken.
NEVER = TenantLimits(requests_per_minute=1_000_000_000, tokens_per_minute=1_000_000_000_000,
                     token_budget=1_000_000_000_000_000)
BODY = {"model": "base", "prompt": "The ocean is", "max_tokens": 16}
# Fewer tokens than the charge (the estimate and the 16-token cap): settling refunds some.
USAGE = {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
ADMIT_PROMPT, ADMIT_CAP = 4, 16


# --- the stub backend -------------------------------------------------------------------------

def stub_answer(method: str, path: str) -> tuple[str, bytes, str]:
    """Status line, body and content type for one request, as vLLM answers it."""
    if path == "/health":
        return "200 OK", b"", "application/json"
    if path == "/metrics":
        return ("200 OK", b'vllm:num_requests_running{engine="0"} 0.0\n'
                b'vllm:num_requests_waiting{engine="0"} 0.0\n', "text/plain")
    if path == "/v1/models":
        listing = {"object": "list", "data": [{"id": "base", "object": "model",
                                               "owned_by": "vllm", "root": "base"}]}
        return "200 OK", json.dumps(listing).encode(), "application/json"
    if method == "POST" and path == "/v1/completions":
        answer = {"id": "cmpl-stub", "object": "text_completion", "created": int(time.time()),
                  "model": "base", "choices": [{"index": 0, "text": " blue" * 12,
                                                "logprobs": None, "finish_reason": "stop",
                                                "stop_reason": None}],
                  "usage": USAGE}
        return "200 OK", json.dumps(answer).encode(), "application/json"
    return "404 Not Found", b'{"error": "not found"}', "application/json"


class StubProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies: what httpx sends the backend."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1")
            length = content_length(head)
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            method, path = head.split(" ", 2)[:2]
            status, body, kind = stub_answer(method, path)
            self.transport.write(f"HTTP/1.1 {status}\r\ncontent-type: {kind}\r\n"
                                 f"content-length: {len(body)}\r\n\r\n".encode() + body)


def content_length(head: str) -> int:
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value)
    return 0


async def serve_stub(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(StubProtocol, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def stub_backend(log_path: Path) -> Iterator[str]:
    """The stub in its own process; its URL."""
    port = free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks.limits_overhead",
                                    "--stub-port", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_until_ok(url + "/health", process, 30):
            raise RuntimeError(f"the stub backend did not start:\n{log_path.read_text()}")
        yield url
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    server = RedisServer()
    try:
        server.start()
        yield server.url
    finally:
        server.remove()


# --- the gateway ------------------------------------------------------------------------------

def write_config(path: Path, backend: str, adapters_dir: Path, store: str | None) -> Path:
    limits = f'[limits]\nstore = "{store}"\n' if store else ""
    path.write_text(f"""{limits}
[registry]
url = "sqlite:///{path.parent / 'registry.sqlite3'}"
[model]
path = "{paths.default_model_dir()}"
[engine]
backends = ["{backend}"]
[adapters]
dir = "{adapters_dir}"
roots = []
[tenants.limited]
api_keys = ["{KEYS['limited']}"]
adapters = ["*"]
max_concurrency = 256
requests_per_minute = {NEVER.requests_per_minute}
tokens_per_minute = {NEVER.tokens_per_minute}
token_budget = {NEVER.token_budget}
budget_period = "day"
[tenants.unlimited]
api_keys = ["{KEYS['unlimited']}"]
adapters = ["*"]
max_concurrency = 256
""")
    return path


@contextlib.contextmanager
def gateway(work: Path, backend: str, store: str | None,
            pin: bool) -> Iterator[GatewayProcess]:
    """With `pin`, the gateway (a child, inheriting this process's CPUs) on GATEWAY_CPU."""
    name = "redis" if store else "memory"
    directory = work / name
    (directory / "adapters").mkdir(parents=True)
    config = write_config(directory / "gateway.toml", backend, directory / "adapters", store)
    if pin:
        os.sched_setaffinity(0, {GATEWAY_CPU})
    try:
        process = GatewayProcess.start(config, directory / "gateway.log", timeout_s=120)
    finally:
        if pin:
            os.sched_setaffinity(0, {OTHERS_CPU})
    try:
        yield process
    finally:
        process.stop()


# --- load -------------------------------------------------------------------------------------

async def one_request(session: aiohttp.ClientSession, url: str, tenant: str) -> float:
    started = time.perf_counter()
    async with session.post(url + "/v1/completions", json=BODY,
                            headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as response:
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{tenant}: HTTP {response.status}: {body[:300]!r}")
    return time.perf_counter() - started


async def latencies(session: aiohttp.ClientSession, url: str,
                    requests: int) -> dict[str, list[float]]:
    """Sequential requests, the tenants alternating (and which goes first, each pair)."""
    samples: dict[str, list[float]] = {tenant: [] for tenant in TENANTS}
    for index in range(requests):
        for tenant in TENANTS if index % 2 == 0 else TENANTS[::-1]:
            samples[tenant].append(await one_request(session, url, tenant))
    return samples


async def rate(session: aiohttp.ClientSession, url: str, tenant: str, concurrency: int,
               seconds: float) -> float:
    """Requests per second completed by `concurrency` closed-loop clients in `seconds`."""
    deadline = time.perf_counter() + seconds
    done = 0

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one_request(session, url, tenant)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def throughput(session: aiohttp.ClientSession, url: str, concurrency: int,
                     seconds: float, rounds: int) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {tenant: [] for tenant in TENANTS}
    for index in range(rounds):
        for tenant in TENANTS if index % 2 == 0 else TENANTS[::-1]:
            rates[tenant].append(await rate(session, url, tenant, concurrency, seconds))
    return rates


@dataclass
class GatewayResult:
    store: str
    latency: dict[str, list[float]]
    rates: dict[str, list[float]]


async def measure_gateway(url: str, store: str, args: argparse.Namespace) -> GatewayResult:
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await rate(session, url, "limited", args.concurrency, 1.0)  # warm-up
        await rate(session, url, "unlimited", args.concurrency, 1.0)
        latency = await latencies(session, url, args.requests)
        rates = await throughput(session, url, args.concurrency, args.seconds, args.rounds)
    return GatewayResult(store, latency, rates)


# --- the check alone, in this process ---------------------------------------------------------

async def timed(call: Callable[[], Awaitable[object]], calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def record(tenant: str) -> RequestRecord:
    now = time.time()
    return RequestRecord(tenant, "base", AdapterType.BASE, now, now, 0.0, 200,
                         prompt_tokens=USAGE["prompt_tokens"],
                         completion_tokens=USAGE["completion_tokens"])


async def in_process(counters: Counters, calls: int) -> dict[str, list[float]]:
    """admit alone; settle as the request path pays it; the adjustment it schedules."""
    quota = Quota(counters, lambda tenant: NEVER)
    samples: dict[str, list[float]] = {"admit": [], "settle": [], "adjust (background)": []}
    for _ in range(calls // 10):  # warm-up: the connection, the script cached in Redis
        quota.settle(await quota.admit("bench", prompt_estimate=ADMIT_PROMPT,
                                       output_cap=ADMIT_CAP), record("bench"))
    await settled()
    for _ in range(calls):
        started = time.perf_counter()
        charge = await quota.admit("bench", prompt_estimate=ADMIT_PROMPT, output_cap=ADMIT_CAP)
        admitted = time.perf_counter()
        quota.settle(charge, record("bench"))
        scheduled = time.perf_counter()
        await settled()
        samples["admit"].append(admitted - started)
        samples["settle"].append(scheduled - admitted)
        samples["adjust (background)"].append(time.perf_counter() - scheduled)
    await quota.aclose()
    return samples


async def settled() -> None:
    """Wait for the adjustments `settle` scheduled (every task but this one)."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others)


# --- report -----------------------------------------------------------------------------------

def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.3f} ms"


def us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e6 * seconds:.0f} µs"


def p(values: list[float], q: float) -> float:
    found = percentile(values, q)
    assert found is not None
    return found


def print_latency(results: list[GatewayResult]) -> None:
    print("| store | tenant | requests | p50 | p99 | mean |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for tenant in TENANTS:
            values = result.latency[tenant]
            print(f"| {result.store} | {tenant} | {len(values)} | {ms(p(values, 50))} | "
                  f"{ms(p(values, 99))} | {ms(statistics.fmean(values))} |")
    print()
    print("| store | added p50 | added p99 | added mean |")
    print("|---|---|---|---|")
    for result in results:
        on, off = result.latency["limited"], result.latency["unlimited"]
        print(f"| {result.store} | {ms(p(on, 50) - p(off, 50))} | "
              f"{ms(p(on, 99) - p(off, 99))} | "
              f"{ms(statistics.fmean(on) - statistics.fmean(off))} |")
    print()


def print_throughput(results: list[GatewayResult], args: argparse.Namespace) -> None:
    print(f"| store | limited req/s (rounds of {args.seconds:g} s) | unlimited req/s | "
          f"limited / unlimited (means) | median of round ratios | per round |")
    print("|---|---|---|---|---|---|")
    for result in results:
        on, off = result.rates["limited"], result.rates["unlimited"]
        ratios = [a / b for a, b in zip(on, off, strict=True)]
        print(f"| {result.store} | {' '.join(f'{r:.0f}' for r in on)} | "
              f"{' '.join(f'{r:.0f}' for r in off)} | "
              f"**{statistics.fmean(on) / statistics.fmean(off):.3f}** | "
              f"{statistics.median(ratios):.3f} | {', '.join(f'{r:.3f}' for r in ratios)} |")
    print()


def print_in_process(samples: dict[str, dict[str, list[float]]]) -> None:
    print("| counters | call | calls | p50 | p99 | mean |")
    print("|---|---|---|---|---|---|")
    for store, parts in samples.items():
        for part, values in parts.items():
            print(f"| {store} | {part} | {len(values)} | {us(p(values, 50))} | "
                  f"{us(p(values, 99))} | {us(statistics.fmean(values))} |")
    print()


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def load() -> str:
    """The machine's load average (1, 5, 15 min): other work shares these cores."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# --- main -------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> None:
    if args.pin:
        os.sched_setaffinity(0, {OTHERS_CPU})  # Redis and the stub inherit it
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        redis_url = stack.enter_context(redis_server()) if "redis" in args.stores else None
        backend = stack.enter_context(stub_backend(work / "stub.log"))
        results = []
        for store in args.stores:
            url = redis_url if store == "redis" else None
            with gateway(work, backend, url, args.pin) as process:
                print(f"measuring the gateway with {store} counters ...", flush=True)
                results.append(uvloop.run(measure_gateway(process.url, store, args)))
        checks = {}
        for store in args.stores:
            counters: Counters = RedisCounters(redis_url) if store == "redis" \
                else MemoryCounters()
            checks[store] = uvloop.run(in_process(counters, args.admit_calls))
    print(f"ended {utc_now()}; load average {load()}\n")
    print_latency(results)
    print_throughput(results, args)
    print_in_process(checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000,
                        help="sequential requests per tenant and store")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput run")
    parser.add_argument("--rounds", type=int, default=8, help="throughput rounds per tenant")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--admit-calls", type=int, default=5000)
    parser.add_argument("--stores", nargs="+", choices=("redis", "memory"),
                        default=["redis", "memory"])
    parser.add_argument("--pin", action="store_true",
                        help="the gateway alone on CPU 1, everything else on CPU 0")
    parser.add_argument("--stub-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub_port is not None:
        uvloop.run(serve_stub(args.stub_port))
        return
    print(f"started {utc_now()}; load average {load()}; {args}", flush=True)
    run(args)


if __name__ == "__main__":
    main()
