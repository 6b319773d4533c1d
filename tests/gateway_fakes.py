"""A fake vLLM OpenAI server behind `httpx.MockTransport`, and a gateway wired to it.

The fake records every request it gets (path, headers, JSON body), so tests assert on what
the gateway forwards; it answers the way vLLM 0.32 does for the routes the gateway uses
(`/health`, runtime LoRA load/unload, chat and text completions, the Responses API, SSE
streams).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import FastAPI

from adapters.base_checkpoint import BaseCheckpoint
from adapters.store import CompiledStore
from gateway.app import create_app
from gateway.config import GatewayConfig, load_config
from gateway.engine.limits import EngineLimits
from gateway.registry import AdapterRegistry, RegistryDatabase
from gateway.registry.artifacts import ArtifactStore, LocalArtifacts
from gateway.serve import routing_policy
from gateway.upstream.discovery import Resolver, system_resolver
from gateway.upstream.pool import BackendPool
from tests.factories import LLAMA_TARGETS, random_adapter

ACME_KEY = "sk-acme-0123456789abcdef"
GLOBEX_KEY = "sk-globex-0123456789abcdef"
ADMIN_KEY = "sk-admin-0123456789abcdef"
STREAM_TEXT = ("Hel", "lo", " there")
# Chunks of a stream: vLLM's role-only first chunk, then one per token.
STREAM_CHUNKS = 1 + len(STREAM_TEXT)
USAGE = {"prompt_tokens": 3, "completion_tokens": len(STREAM_TEXT), "total_tokens": 6}


@dataclass
class Recorded:
    path: str
    headers: httpx.Headers
    body: dict | None


class FakeStream(httpx.AsyncByteStream):
    """SSE bytes in the given chunks, then optionally a wait for `linger` (a backend slow to
    end the response after its last event), a transport error or a hang (a generation still
    running)."""

    def __init__(self, chunks: list[bytes], *, error: Exception | None = None,
                 hang: bool = False, linger: asyncio.Event | None = None) -> None:
        self.chunks = chunks
        self.error = error
        self.hang = hang
        self.linger = linger
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.linger is not None:
            await self.linger.wait()
        if self.error is not None:
            raise self.error
        if self.hang:
            await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakeVllm:
    url: str = "http://vllm-a:8000"
    down: bool = False
    stream_error: Exception | None = None
    hang_streams: bool = False
    hang_completions: bool = False
    # Set: every stream's response stays open after its last event until this is set.
    linger_streams: asyncio.Event | None = None
    # (status, JSON body) every completion gets instead of a generation: vLLM refusing it.
    refusal: tuple[int, object] | None = None
    # An event a stream carries after its first chunk, then `[DONE]`: vLLM failing mid-stream.
    stream_event: dict | None = None
    # Set: a completion closes the connection without an answer (the server died on it).
    drops_completions: bool = False
    # Set: each completion's answer, decided as it arrives, waits for a release of this.
    answer_gate: asyncio.Semaphore | None = None
    # Set: each adapter load waits until this is set.
    load_gate: asyncio.Event | None = None
    cancelled: int = 0
    load_error: str | None = None
    dies_on_load: bool = False
    requests: list[Recorded] = field(default_factory=list)
    loaded: dict[str, str] = field(default_factory=dict)
    streams: list[FakeStream] = field(default_factory=list)

    def received(self, path: str) -> list[dict | None]:
        return [request.body for request in self.requests if request.path == path]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content) if request.content else None
        self.requests.append(Recorded(request.url.path, request.headers, body))
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/load_lora_adapter":
            if self.load_gate is not None:
                await self.load_gate.wait()
            return self._load(body)
        if path == "/v1/unload_lora_adapter":
            if self.loaded.pop(body["lora_name"], None) is None:
                return _vllm_error(404, f"The lora adapter '{body['lora_name']}' cannot be found.")
            return httpx.Response(200, text="Success")
        if path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
            if self.hang_completions and not body.get("stream"):
                await self._hang()
            if self.drops_completions:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.", request=request)
            if path == "/v1/responses":
                return self._respond(body, request.headers["x-request-id"])
            answer = self._complete(path, body, request.headers["x-request-id"])
            if self.answer_gate is not None:
                await self.answer_gate.acquire()
            return answer
        return _vllm_error(404, "Not Found")

    async def _hang(self) -> None:
        """A generation that runs until the gateway gives up on it (cancels the request)."""
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def _load(self, body: dict) -> httpx.Response:
        if self.dies_on_load:
            self.down = True  # vLLM answers 500 when its engine dies, then stops answering
            return _vllm_error(500, "EngineCore encountered an issue")
        if self.load_error is not None:
            return _vllm_error(500, self.load_error)
        if body["lora_name"] in self.loaded:
            return _vllm_error(400, f"The lora adapter '{body['lora_name']}' has already been "
                                    f"loaded. If you want to load the adapter in place, set "
                                    f"'load_inplace' to True.")
        self.loaded[body["lora_name"]] = body["lora_path"]
        return httpx.Response(200, text="Success")

    def _complete(self, path: str, body: dict, request_id: str) -> httpx.Response:
        if self.refusal is not None:
            return httpx.Response(self.refusal[0], json=self.refusal[1])
        model = body["model"]
        if model != "base" and model not in self.loaded:
            return _vllm_error(404, f"The model `{model}` does not exist.")
        chat = path == "/v1/chat/completions"
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        if body.get("stream"):
            chunks = _sse_chunks(response_id, model, _wants_usage(body))
            if self.stream_error or self.hang_streams:
                chunks = chunks[:-1]
            if self.stream_event is not None:
                event = b"data: " + json.dumps(self.stream_event).encode() + b"\n\n"
                chunks = [chunks[0].partition(b"\n\n")[0] + b"\n\n", event, chunks[-1]]
            stream = FakeStream(chunks, error=self.stream_error, hang=self.hang_streams,
                                linger=self.linger_streams)
            self.streams.append(stream)
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  stream=stream)
        choice = ({"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                   "finish_reason": "stop"} if chat else
                  {"index": 0, "text": "Hello there", "finish_reason": "stop"})
        return httpx.Response(200, json={
            "id": response_id, "object": "chat.completion" if chat else "text_completion",
            "created": 1, "model": model, "choices": [choice],
            "usage": USAGE})


    def _respond(self, body: dict, request_id: str) -> httpx.Response:
        """The Responses API: a response object, or its typed events ending with
        `response.completed` (cut before it, as a backend dying mid-stream would)."""
        model = body["model"]
        if model != "base" and model not in self.loaded:
            return _vllm_error(404, f"The model `{model}` does not exist.")
        if not body.get("stream"):
            return httpx.Response(200, json=_response_object(request_id, model, "completed"))
        events = _response_events(request_id, model)
        if self.stream_error:
            events = events[:-1]
        stream = FakeStream(events, error=self.stream_error)
        self.streams.append(stream)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    """Poll `condition` while the app runs in other tasks; fail rather than hang."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def _wants_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _sse_chunks(response_id: str, model: str, usage: bool) -> list[bytes]:
    """vLLM-style chunks (a role-only chunk, one per token, a usage-only chunk when asked
    for), with one event split across two reads."""
    header = {"id": response_id, "object": "chat.completion.chunk", "created": 1, "model": model}
    deltas = [{"role": "assistant", "content": ""}, *({"content": text} for text in STREAM_TEXT)]
    events = [{**header, "choices": [{"index": 0, "delta": delta}]} for delta in deltas]
    if usage:
        events.append({**header, "choices": [], "usage": USAGE})
    data = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events)
    middle = len(data) // 2
    return [data[:middle], data[middle:], b"data: [DONE]\n\n"]


def _response_object(request_id: str, model: str, status: str) -> dict:
    text = "".join(STREAM_TEXT)
    message = {"type": "message", "id": "msg_1", "role": "assistant", "status": status,
               "content": [{"type": "output_text", "text": text, "annotations": []}]}
    return {"id": request_id, "object": "response", "created_at": 1, "model": model,
            "status": status, "output": [message] if status == "completed" else [],
            "usage": {"input_tokens": USAGE["prompt_tokens"],
                      "output_tokens": USAGE["completion_tokens"],
                      "total_tokens": USAGE["total_tokens"]} if status == "completed" else None}


def _response_events(request_id: str, model: str) -> list[bytes]:
    """vLLM-style Responses events: created, one text delta per token, completed."""
    events = [{"type": "response.created",
               "response": _response_object(request_id, model, "in_progress")}]
    events += [{"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
                "content_index": 0, "delta": text, "logprobs": []} for text in STREAM_TEXT]
    events.append({"type": "response.completed",
                   "response": _response_object(request_id, model, "completed")})
    return [f"event: {event['type']}\ndata: {json.dumps(event | {'sequence_number': number})}"
            f"\n\n".encode() for number, event in enumerate(events)]


def _vllm_error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "BadRequestError",
                                                  "param": None, "code": status}})


def fake_transport(*vllms: FakeVllm) -> httpx.MockTransport:
    by_host = {httpx.URL(vllm.url).host: vllm for vllm in vllms}

    async def route(request: httpx.Request) -> httpx.Response:
        return await by_host[request.url.host].handle(request)

    return httpx.MockTransport(route)


def make_demo_adapters(base_dir: Path, out_dir: Path) -> Path:
    """`caps` and `pirate` (DoRA) and `plain` (LoRA), as PEFT directories in `out_dir`."""
    for seed, (name, use_dora) in enumerate([("caps", True), ("pirate", True),
                                             ("plain", False)], start=1):
        random_adapter(base_dir, out_dir / name, seed=seed, r=4, lora_alpha=8,
                       target_modules=LLAMA_TARGETS, use_dora=use_dora)
    return out_dir


def write_config(directory: Path, base_dir: Path, adapters_dir: Path, *, extra_root: Path,
                 backends: list[str], eager: bool, metrics: str = "", engine: str = "",
                 routing: str = "", adapters: str = "", acme: str = "", limits: str = "",
                 ) -> Path:
    """acme may use `caps` and `plain` (2 at a time, 64 tokens); globex may use every adapter;
    `engine`, `adapters` and `acme` hold more `[engine]`, `[adapters]` and `[tenants.acme]`
    keys, `routing` and `limits` optional `[routing]` and `[limits]` tables."""
    path = directory / "gateway.toml"
    path.write_text(f"""
[model]
path = "{base_dir}"
[server]
max_body_bytes = 4096
cache_salt_secret = "test-secret"
[engine]
backends = {json.dumps(backends)}
{engine}
[adapters]
dir = "{adapters_dir}"
roots = ["{extra_root}"]
eager = {json.dumps(eager)}
{adapters}
[admin]
api_keys = ["{ADMIN_KEY}"]
{metrics}
{routing}
{limits}
[tenants.acme]
api_keys = ["{ACME_KEY}"]
adapters = ["caps", "plain"]
max_concurrency = 2
max_tokens = 64
{acme}
[tenants.globex]
api_keys = ["{GLOBEX_KEY}"]
adapters = ["*"]
""")
    return path


@dataclass
class Gateway:
    app: FastAPI
    config: GatewayConfig
    registry: AdapterRegistry
    pool: BackendPool
    vllms: tuple[FakeVllm, ...]

    @property
    def vllm(self) -> FakeVllm:
        return self.vllms[0]

    def client(self, key: str | None = None, *, client_host: str = "127.0.0.1",
               ) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        transport = httpx.ASGITransport(app=self.app, client=(client_host, 50000))
        return httpx.AsyncClient(transport=transport, base_url="http://gateway", headers=headers)


def sqlite_registry(directory: Path) -> RegistryDatabase:
    """A durable registry of its own, in `directory`."""
    return RegistryDatabase.open(f"sqlite:///{directory / 'registry.sqlite3'}")


async def make_gateway(tmp_path: Path, base_dir: Path, demo_adapters: Path, store_dir: Path,
                       *vllms: FakeVllm, eager: bool = False, metrics: str = "",
                       engine: str = "", routing: str = "", backends: list[str] | None = None,
                       resolver: Resolver = system_resolver,
                       client: httpx.AsyncClient | None = None, adapters: str = "",
                       artifacts: ArtifactStore | None = None, acme: str = "",
                       limits: str = "") -> Gateway:
    """A gateway over a fresh copy of the demo adapters (uploads write there), in front of
    `vllms` (one fake by default); `metrics` is an optional `[metrics]` TOML table, `engine`
    and `adapters` more `[engine]` and `[adapters]` keys, `routing` a `[routing]` table,
    `acme` more `[tenants.acme]` keys (its limits), `limits` a `[limits]` table;
    `backends` (the fakes' URLs by default) may hold DNS names, which `resolver` resolves;
    `client` (real vLLMs) replaces the fakes; `artifacts` (local directories by default) is
    the store."""
    vllms = vllms or (FakeVllm(),)
    adapters_dir = shutil.copytree(demo_adapters, tmp_path / "adapters")
    extra_root = tmp_path / "extra-root"
    extra_root.mkdir()
    config = load_config(write_config(tmp_path, base_dir, adapters_dir, extra_root=extra_root,
                                      backends=backends or [vllm.url for vllm in vllms],
                                      eager=eager,
                                      metrics=metrics, engine=engine, routing=routing,
                                      adapters=adapters, acme=acme, limits=limits))
    pool = BackendPool(config.engine.backends,
                       client or httpx.AsyncClient(transport=fake_transport(*vllms)),
                       routing=routing_policy(config), resolver=resolver)
    artifacts = artifacts or LocalArtifacts(CompiledStore(store_dir), tmp_path / "uploads")
    registry = AdapterRegistry(BaseCheckpoint(base_dir), artifacts, config.adapters.roots, pool,
                               sqlite_registry(tmp_path), EngineLimits.from_config(config.engine),
                               uploads=tmp_path / "uploads")
    await registry.add_directory(config.adapters.dir)
    return Gateway(create_app(config, registry, pool), config, registry, pool, vllms)
