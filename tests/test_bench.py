"""`dora-gateway bench`: timing streamed requests, the report, the chart, and one real run
through the session's gateway.

The unit tests drive the load generator against a fake OpenAI server (`httpx.MockTransport`)
whose streams move an injected clock, so every timing asserted is exact and nothing depends
on the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from dataclasses import dataclass, field

import httpx
import pytest
from matplotlib.image import imread

from gateway.bench.command import execute, settings_from
from gateway.bench.load import (
    BenchError,
    BenchSettings,
    Job,
    Measurement,
    gateway_url,
    measure,
    plan,
    prompt,
    run_bench,
)
from gateway.bench.report import summarize, table
from gateway.cli import build_parser, main
from gateway.engine.process import free_port
from gateway.telemetry.latency import percentile
from tests.conftest import TEST_OUTPUT
from tests.gateway_fakes import GLOBEX_KEY
from tests.gateway_process import GATEWAY_CLI

KEY = "sk-bench-0123456789abcdef"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Clock:
    """Time as the fake server says it is."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sse(*events: dict | str) -> list[bytes]:
    return [b"data: " + (e if isinstance(e, str) else json.dumps(e)).encode() + b"\n\n"
            for e in events]


def text_event(text: str, chat: bool = False) -> dict:
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    return {"id": "x", "choices": [choice], "usage": None}


def usage_event(completion: int, prompt_tokens: int = 7) -> dict:
    return {"id": "x", "choices": [], "usage": {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion}}


class Script(httpx.AsyncByteStream):
    """SSE chunks, each one arriving when the clock reads its time."""

    def __init__(self, clock: Clock, timed: list[tuple[float, bytes]]) -> None:
        self.clock, self.timed = clock, timed

    async def __aiter__(self):
        for at, chunk in self.timed:
            self.clock.now = at
            yield chunk


def scripted_client(clock: Clock, timed: list[tuple[float, bytes]]) -> httpx.AsyncClient:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=Script(clock, timed))
    return httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://gw")


@dataclass
class FakeGateway:
    """An OpenAI-compatible server: one key, some models, streams of one-token chunks with the
    final usage chunk vLLM sends; it records what it was asked and what ran at once."""

    models: set[str] = field(default_factory=lambda: {"base", "caps", "caps-lora"})
    failing: set[str] = field(default_factory=set)
    bodies: list[dict] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    most_running: int = 0
    most_models_running: int = 0

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle),
                                 base_url="http://gw", headers={"Authorization": f"Bearer {KEY}"})

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return _openai_error(401, "Invalid API key (the gateway's words)")
        if body["model"] not in self.models:
            return _openai_error(404, f"The model `{body['model']}` does not exist.")
        if body["model"] in self.failing and body["max_tokens"] > 1:
            return _openai_error(503, "No backend is available")
        self.bodies.append(body)
        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              stream=_Running(self, body))


class _Running(httpx.AsyncByteStream):
    """A stream that counts as running from its request until the client closes it."""

    def __init__(self, gateway: FakeGateway, body: dict) -> None:
        self.gateway, self.body, self.closed = gateway, body, False
        gateway.running.append(body["model"])
        gateway.most_running = max(gateway.most_running, len(gateway.running))
        gateway.most_models_running = max(gateway.most_models_running, len(set(gateway.running)))

    async def __aiter__(self):
        tokens = self.body["max_tokens"]
        for chunk in sse(*[text_event(" w") for _ in range(tokens)], usage_event(tokens),
                         "[DONE]"):
            await asyncio.sleep(0)  # let the other requests in flight move on
            yield chunk

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.gateway.running.remove(self.body["model"])


def _openai_error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "error",
                                                  "param": None, "code": status}})


def settings(**overrides) -> BenchSettings:
    values = {"url": "http://gw", "models": ("base", "caps", "caps-lora"),
              "lora_twins": {"caps": "caps-lora"}, "concurrency": 3, "requests": 4,
              "prompt_tokens": 5, "max_tokens": 4, "rounds": 2}
    return BenchSettings(**values | overrides)


def bench(settings_: BenchSettings, client: httpx.AsyncClient, **kwargs) -> list[Measurement]:
    async def run() -> list[Measurement]:
        async with client:
            return await run_bench(settings_, client, **kwargs)
    return asyncio.run(run())


def one(client: httpx.AsyncClient, clock: Clock, chat: bool = False) -> Measurement:
    async def run() -> Measurement:
        async with client:
            return await measure(client, settings(endpoint="chat" if chat else "completions"),
                                 Job("caps", 0, 0, 0), clock)
    return asyncio.run(run())


def timing(**fields) -> Measurement:
    values = {"model": "base", "index": 0, "phase": 0, "round": 0, "start_s": 0.0,
              "e2e_s": 1.0, "ttft_s": 0.1, "tpot_s": 0.1, "completion_tokens": 4,
              "prompt_tokens": 5, "text_chunks": 4, "error": None}
    return Measurement(**values | fields)


# Timing one stream


def test_ttft_and_tpot_come_from_the_first_and_last_generated_text():
    clock = Clock()
    clock.now = 10.0
    timed = list(zip([10.5, 10.6, 10.8, 11.1, 11.2, 11.3],
                     sse(text_event("He"), text_event("llo"), text_event(" th"),
                         text_event("ere"), usage_event(4), "[DONE]"), strict=True))
    m = one(scripted_client(clock, timed), clock)
    assert m.error is None
    assert m.ttft_s == pytest.approx(0.5)
    assert m.tpot_s == pytest.approx((11.1 - 10.5) / 3)
    assert m.e2e_s == pytest.approx(1.3)
    assert (m.completion_tokens, m.prompt_tokens, m.text_chunks) == (4, 7, 4)


def test_chat_counts_delta_content_not_the_role_chunk():
    clock = Clock()
    role = {"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    timed = list(zip([0.2, 0.7, 0.9, 1.0, 1.1],
                     sse(role, text_event("A", chat=True), text_event("B", chat=True),
                         usage_event(2), "[DONE]"), strict=True))
    m = one(scripted_client(clock, timed), clock, chat=True)
    assert m.error is None and m.text_chunks == 2
    assert m.ttft_s == pytest.approx(0.7)
    assert m.tpot_s == pytest.approx(0.2)


def test_usage_counts_tokens_that_arrive_together_and_chunks_stand_in_without_it():
    clock = Clock()
    texts = sse(text_event("one"), text_event("two three"))
    with_usage = one(scripted_client(clock, list(zip(
        [1.0, 2.0, 2.1, 2.2], [*texts, *sse(usage_event(3), "[DONE]")], strict=True))), clock)
    assert with_usage.completion_tokens == 3 and with_usage.tpot_s == pytest.approx(0.5)
    clock.now = 0.0
    without = one(scripted_client(clock, list(zip(
        [1.0, 2.0, 2.1], [*texts, *sse("[DONE]")], strict=True))), clock)
    assert without.completion_tokens == 2 and without.prompt_tokens is None
    assert without.tpot_s == pytest.approx(1.0)


@pytest.mark.parametrize(("events", "error"), [
    (['{"error": {"message": "backend died", "code": "backend_error"}}', "[DONE]"],
     "error event in the stream: backend died"),
    ([], "the stream carried no generated text"),
    ([json.dumps(text_event("a"))], "the stream ended before `data: [DONE]`"),
    (["not json"], "not a JSON object in the stream: not json"),
])
def test_a_failed_stream_is_recorded_with_its_reason(events, error):
    clock = Clock()
    m = one(scripted_client(clock, [(1.0, chunk) for chunk in sse(*events)]), clock)
    assert m.error == error and not m.ok


def test_an_http_error_carries_the_servers_openai_message():
    gateway = FakeGateway()
    client = httpx.AsyncClient(transport=httpx.MockTransport(gateway.handle),
                               base_url="http://gw", headers={"Authorization": "Bearer wrong"})
    m = one(client, Clock())
    assert m.error == "HTTP 401: Invalid API key (the gateway's words)"


# Sending the load


def test_every_request_streams_forced_tokens_with_usage_and_a_deterministic_prompt():
    gateway = FakeGateway()
    bench(settings(), gateway.client())
    measured = [b for b in gateway.bodies if b["max_tokens"] == 4]
    assert len(measured) == 12 and len(gateway.bodies) == 15  # plus one warm-up per model
    for body in gateway.bodies:
        assert body["stream"] is True and body["ignore_eos"] is True
        assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0
        assert len(body["prompt"].split()) == 5
    prompts = {(b["model"], b["prompt"]) for b in measured}
    assert {p for m, p in prompts if m == "base"} == {p for m, p in prompts if m == "caps"}
    assert len({p for _, p in prompts}) == 4
    assert prompt(5, 3) == prompt(5, 3) != prompt(5, 4)


def test_chat_endpoint_sends_messages():
    gateway = FakeGateway()
    bench(settings(endpoint="chat", warmup=False, models=("base",), lora_twins={}),
          gateway.client())
    assert gateway.bodies[0]["messages"] == [{"role": "user", "content": prompt(5, 0)}]


def test_phases_run_one_model_at_a_time_and_reverse_the_order_every_other_round():
    gateway = FakeGateway()
    done: list[Measurement] = []
    result = bench(settings(requests=5), gateway.client(), on_done=done.append)
    assert done == result and len(result) == 15
    assert gateway.most_models_running == 1 and gateway.most_running == 3
    order = [b["model"] for b in gateway.bodies if b["max_tokens"] == 4]
    assert order == ["base"] * 3 + ["caps"] * 3 + ["caps-lora"] * 3 + \
        ["caps-lora"] * 2 + ["caps"] * 2 + ["base"] * 2
    assert {(m.model, m.round) for m in result if m.index >= 3} == {
        ("base", 1), ("caps", 1), ("caps-lora", 1)}


def test_mixed_interleaves_the_models_in_one_pool():
    gateway = FakeGateway()
    result = bench(settings(mode="mixed", warmup=False), gateway.client())
    assert [b["model"] for b in gateway.bodies[:3]] == ["base", "caps", "caps-lora"]
    assert gateway.most_models_running == 3 and gateway.most_running == 3
    assert {m.phase for m in result} == {0} and len(result) == 12


def test_plan_splits_requests_over_rounds():
    phases = plan(settings(models=("a", "b"), requests=3, rounds=2))
    assert [(p[0].model, len(p), p[0].round) for p in phases] == [
        ("a", 2, 0), ("b", 2, 0), ("b", 1, 1), ("a", 1, 1)]
    assert [p[0].phase for p in phases] == [0, 1, 2, 3]
    assert [len(p) for p in plan(settings(models=("a",), requests=1, rounds=3))] == [1]


def test_a_bad_key_or_model_stops_at_the_warm_up_with_the_gateways_message():
    with pytest.raises(BenchError, match="model 'nope' failed: HTTP 404: The model `nope` does"):
        bench(settings(models=("base", "nope"), lora_twins={}), FakeGateway().client())


# The report


def test_percentiles_are_nearest_rank():
    assert percentile(list(range(1, 11)), 50) == 5
    assert percentile(list(range(1, 11)), 95) == 10
    assert percentile(list(range(1, 21)), 95) == 19
    assert percentile([3.0], 95) == 3.0 and percentile([], 50) is None


def test_summary_ratios_leave_out_failed_requests():
    runs = [timing(model="base", tpot_s=0.100), timing(model="base", tpot_s=0.104),
            timing(model="caps", tpot_s=0.120, phase=1), timing(model="caps-lora", tpot_s=0.110,
                                                             phase=2),
            timing(model="caps", tpot_s=0.001, phase=1, error="HTTP 429: busy")]
    rows = {row.model: row for row in summarize(settings(), runs)}
    caps = rows["caps"]
    assert (caps.requests, caps.errors, caps.tpot_p50_ms) == (2, 1, pytest.approx(120))
    assert caps.tpot_vs_base == pytest.approx(1.2)
    assert caps.tpot_vs_twin == pytest.approx(0.120 / 0.110)
    assert caps.twin == "caps-lora" and rows["caps-lora"].twin is None
    assert rows["base"].tpot_vs_base == pytest.approx(1.0)
    assert rows["base"].tpot_p95_ms == pytest.approx(104)
    assert caps.tokens_per_s == pytest.approx(4 / 1.0)


def test_table_aligns_the_figures_and_marks_missing_ones():
    runs = [timing(model="base", ttft_s=0.25, tpot_s=0.1),
            timing(model="caps", tpot_s=0.1013, phase=1), timing(model="caps-lora", phase=2,
                                                                 error="HTTP 503: down")]
    lines = table(summarize(settings(), runs)).splitlines()
    assert lines[0].split()[:3] == ["model", "requests", "errors"]
    assert len({len(line) for line in lines}) == 1
    base, caps, lora = (line.split() for line in lines[1:])
    assert base[:4] == ["base", "1", "0", "250.0"] and base[-3:] == ["1.000", "-", "-"]
    assert caps[-3:] == ["1.013", "caps-lora", "-"]
    assert lora[:3] == ["caps-lora", "1", "1"] and lora[3:8] == ["-"] * 5


def test_execute_writes_json_and_a_png_and_prints_the_table(tmp_path, capsys):
    execute(settings(), FakeGateway().client(), tmp_path / "out", progress=False)
    doc = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert doc["settings"]["models"] == ["base", "caps", "caps-lora"]
    assert "api_key" not in json.dumps(doc["settings"]) and KEY not in json.dumps(doc)
    assert doc["machine"]["cpu_count"] >= 1 and doc["started_at"]
    assert [row["model"] for row in doc["summary"]] == ["base", "caps", "caps-lora"]
    assert len(doc["requests"]) == 12
    assert all(r["error"] is None and r["completion_tokens"] == 4 for r in doc["requests"])
    png = tmp_path / "out" / "bench.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = imread(png).shape
    assert width > 600 and height > 300
    assert "caps-lora" in capsys.readouterr().out


def test_execute_fails_when_every_request_fails_but_keeps_the_json(tmp_path):
    gateway = FakeGateway(failing={"base"})
    with pytest.raises(BenchError, match=r"every request failed.*HTTP 503: No backend"):
        execute(settings(models=("base",), lora_twins={}), gateway.client(), tmp_path,
                progress=False)
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert doc["summary"][0]["errors"] == 4 and not (tmp_path / "bench.png").exists()


# The command line


def test_options_become_settings():
    args = build_parser().parse_args([
        "bench", "--model", "caps", "--model", "caps-lora", "--model", "caps",
        "--lora-twin", "caps=caps-lora", "--mode", "mixed", "--url", "http://h:1/v1/"])
    got = settings_from(args)
    assert got.models == ("caps", "caps-lora") and got.lora_twins == {"caps": "caps-lora"}
    assert (got.mode, got.concurrency, got.requests, got.max_tokens) == ("mixed", 4, 20, 64)
    assert gateway_url(got.url) == "http://h:1"
    assert settings_from(build_parser().parse_args(["bench"])).models == ("base",)
    with pytest.raises(BenchError, match="not in the mix: caps-lora"):
        settings_from(build_parser().parse_args(["bench", "--model", "caps",
                                                 "--lora-twin", "caps=caps-lora"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--lora-twin", "caps"])


def test_an_unreachable_gateway_exits_1_with_a_clear_message(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["bench", "--url", url, "--no-progress", "--out", str(tmp_path)]) == 1
    assert f"cannot connect to {url}" in capsys.readouterr().err


# Through the real gateway


@pytest.mark.vllm
def test_bench_through_the_real_gateway(real_gateway, tmp_path):
    result = subprocess.run(
        [GATEWAY_CLI, "bench", "--url", real_gateway.url, "--api-key", GLOBEX_KEY,
         "--model", "base", "--model", "caps", "--model", "caps-lora",
         "--lora-twin", "caps=caps-lora", "--concurrency", "2", "--requests", "2",
         "--max-tokens", "8", "--prompt-tokens", "16", "--rounds", "1", "--no-progress",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert len(doc["requests"]) == 6
    assert all(r["error"] is None and r["completion_tokens"] == 8 for r in doc["requests"])
    rows = {row["model"]: row for row in doc["summary"]}
    assert rows["caps"]["tpot_vs_base"] > 0 and rows["caps"]["tpot_vs_twin"] > 0
    assert "caps-lora" in result.stdout
    TEST_OUTPUT.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "bench.png", TEST_OUTPUT / "bench.png")
    assert imread(TEST_OUTPUT / "bench.png").shape[0] > 300
