"""Sending the benchmark's streamed requests and timing each one.

Every request is streamed at temperature 0 with `ignore_eos` (a vLLM extension), so each one
generates exactly `max_tokens` tokens and models differ only in what a token costs them, not
in how many they write.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from adapters.errors import DoraGatewayError
from gateway.names import BASE_MODEL
from gateway.telemetry.latency import carries_generated_text, time_per_output_token

Clock = Callable[[], float]
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Short common words, about one token each, so N words make a prompt of about N tokens.
WORDS = (
    "the", "a", "of", "to", "and", "in", "is", "it", "you", "that", "he", "was", "for", "on",
    "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had",
    "by", "hot", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all",
    "there", "when", "up", "use", "your", "how", "said", "an", "each", "she", "which", "do",
    "their", "time", "if", "will", "way", "about", "many", "then", "them",
)


class BenchError(DoraGatewayError):
    """A benchmark that cannot run, or that measured nothing."""


@dataclass(frozen=True)
class BenchSettings:
    """What shapes the measurements; no API key here, since the settings go into the JSON."""

    url: str
    models: tuple[str, ...]
    base_model: str = BASE_MODEL
    lora_twins: dict[str, str] = field(default_factory=dict)
    concurrency: int = 4
    requests: int = 20
    prompt_tokens: int = 32
    max_tokens: int = 64
    mode: str = "phases"
    rounds: int = 2
    endpoint: str = "completions"
    warmup: bool = True


@dataclass(frozen=True)
class Job:
    model: str
    index: int  # per model: the same index gets the same prompt whatever the model
    phase: int  # requests of one phase run together; phases run one after the other
    round: int


@dataclass(frozen=True)
class Measurement:
    """One request; times in seconds, `start_s` counted from the start of the measurements."""

    model: str
    index: int
    phase: int
    round: int
    start_s: float
    e2e_s: float
    ttft_s: float | None
    tpot_s: float | None
    completion_tokens: int
    prompt_tokens: int | None
    text_chunks: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


def gateway_url(url: str) -> str:
    """The server's root: OpenAI SDK users are used to giving `.../v1`."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def make_client(url: str, api_key: str | None, concurrency: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # A slow CPU engine can take minutes for one long request: only connecting must be quick.
    return httpx.AsyncClient(base_url=gateway_url(url), headers=headers,
                             timeout=httpx.Timeout(900, connect=10),
                             limits=httpx.Limits(max_connections=concurrency,
                                                 max_keepalive_connections=concurrency))


def prompt(words: int, index: int) -> str:
    """The same text for the same index on every run and every model; other indices get other
    text, so vLLM's prefix cache cannot spare one request its prefill because of another."""
    return " ".join(random.Random(index).choices(WORDS, k=words))


def request_body(settings: BenchSettings, job: Job, max_tokens: int) -> dict:
    body = {"model": job.model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    text = prompt(settings.prompt_tokens, job.index)
    if settings.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    return body


def plan(settings: BenchSettings) -> list[list[Job]]:
    """`phases`: each model alone with every concurrency slot, the models in turn, reversed
    every other round so a drift of the machine's speed does not favour one model; `mixed`:
    one phase where the models' requests alternate, so they share the engine's batches."""
    if settings.mode == "mixed":
        return [[Job(model, index, 0, 0) for index in range(settings.requests)
                 for model in settings.models]]
    share, extra = divmod(settings.requests, settings.rounds)
    counts = [share + (round_ < extra) for round_ in range(settings.rounds)]
    phases: list[list[Job]] = []
    first = 0
    for round_, count in enumerate(count for count in counts if count):
        order = settings.models if round_ % 2 == 0 else settings.models[::-1]
        for model in order:
            phases.append([Job(model, first + i, len(phases), round_) for i in range(count)])
        first += count
    return phases


async def run_bench(settings: BenchSettings, client: httpx.AsyncClient, *,
                    clock: Clock = time.perf_counter,
                    on_done: Callable[[Measurement], None] = lambda _: None) -> list[Measurement]:
    """Warm up, then every planned request, `concurrency` at a time within a phase."""
    if settings.warmup:
        await warm_up(settings, client, clock)
    origin = clock()

    def since_origin() -> float:
        return clock() - origin

    slots = asyncio.Semaphore(settings.concurrency)
    measurements: list[Measurement] = []

    async def one(job: Job) -> None:
        async with slots:
            measurement = await measure(client, settings, job, since_origin)
        measurements.append(measurement)
        on_done(measurement)

    for phase in plan(settings):
        await asyncio.gather(*(one(job) for job in phase))
    return measurements


async def warm_up(settings: BenchSettings, client: httpx.AsyncClient, clock: Clock) -> None:
    """One short request per model first: the gateway loads an adapter into vLLM on its first
    use, which must not land in the measured TTFTs; and a wrong URL, key or model name fails
    here once, with the gateway's own message."""
    for model in settings.models:
        result = await measure(client, settings, Job(model, -1, -1, -1), clock, max_tokens=1)
        if not result.ok:
            raise BenchError(f"the warm-up request for model {model!r} failed: {result.error}")


async def measure(client: httpx.AsyncClient, settings: BenchSettings, job: Job, clock: Clock,
                  max_tokens: int | None = None) -> Measurement:
    """Send one streamed request and time it; a failure is recorded, never raised."""
    body = request_body(settings, job, max_tokens or settings.max_tokens)
    stream = StreamTimes()
    start = clock()
    try:
        async with client.stream("POST", PATHS[settings.endpoint], json=body) as response:
            if response.status_code != 200:
                stream.error = await http_error(response)
            else:
                async for line in response.aiter_lines():
                    if line.startswith("data:") and stream.feed(line[5:].strip(), clock()):
                        break
    except httpx.ConnectError as exc:
        stream.error = f"cannot connect to {str(client.base_url).rstrip('/')}: {exc}"
    except httpx.HTTPError as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    return stream.measurement(job, start, clock())


async def http_error(response: httpx.Response) -> str:
    """`HTTP 401: <the server's message>`, from OpenAI's error shape when it is there."""
    await response.aread()
    try:
        message = error_message(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    return f"HTTP {response.status_code}: {message}"


def error_message(error: object) -> str:
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


@dataclass
class StreamTimes:
    """What a stream has shown so far: when generated text arrived, usage, an error."""

    first_token: float | None = None
    last_token: float | None = None
    text_chunks: int = 0
    usage: dict | None = None
    done: bool = False
    error: str | None = None

    def feed(self, data: str, now: float) -> bool:
        """Take one `data:` payload received at `now`; True once the stream is over."""
        if data == "[DONE]":
            self.done = True
            return True
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.error = f"not a JSON object in the stream: {data[:200]}"
        elif event.get("error"):
            self.error = f"error event in the stream: {error_message(event['error'])}"
        else:
            self._event(event, now)
        return self.error is not None

    def _event(self, event: dict, now: float) -> None:
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        if carries_generated_text(event):
            self.text_chunks += 1
            self.first_token = now if self.first_token is None else self.first_token
            self.last_token = now

    def measurement(self, job: Job, start: float, end: float) -> Measurement:
        """TTFT and TPOT as `telemetry.latency` defines them; usage is the token count, text
        chunks the fallback."""
        usage = self.usage or {}
        tokens = usage.get("completion_tokens") or self.text_chunks
        ttft = None if self.first_token is None else self.first_token - start
        tpot = time_per_output_token(self.first_token, self.last_token, tokens)
        return Measurement(job.model, job.index, job.phase, job.round, start, end - start, ttft,
                           tpot, tokens, usage.get("prompt_tokens"), self.text_chunks,
                           self.error or self._incomplete())

    def _incomplete(self) -> str | None:
        if self.first_token is None:
            return "the stream carried no generated text"
        if not self.done:
            return "the stream ended before `data: [DONE]`"
        return None
