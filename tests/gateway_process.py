"""A real gateway, run as an operator runs it: `dora-gateway serve --config FILE`.

Engine tests talk to it over TCP with real clients (httpx, the `openai` SDK), and read vLLM's
own Prometheus metrics to see what reached the engine.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from adapters import paths
from gateway.engine.process import free_port, wait_until_ok
from tests.gateway_fakes import ACME_KEY, ADMIN_KEY, GLOBEX_KEY

GATEWAY_CLI = str(Path(sys.executable).with_name("dora-gateway"))
PROMPT = "The ocean is"


def write_config(path: Path, *, model: Path, adapters_dir: Path, roots: list[Path],
                 backends: list[str], max_lora_rank: int = 16,
                 registry_url: str | None = None, server: str = "", max_loras: int = 2,
                 store_url: str = "", eager: bool = False, limits_store: str = "") -> Path:
    """acme may use `caps` and `pirate`; globex may use every adapter, 16 requests at a time;
    no `backends` makes the gateway start (and supervise) its own vLLM. The registry is
    `registry_url`, by default a SQLite file beside the config ("": no `[registry]` table, so
    the gateway's own default under `$DORA_GATEWAY_HOME`); `server` holds `[server]` keys;
    `store_url` is `[store] url` (none: local directories), `limits_store` `[limits] store`
    (none: the counters in the gateway's memory)."""
    if registry_url is None:
        registry_url = f"sqlite:///{path.parent / 'registry.sqlite3'}"
    registry = f'[registry]\nurl = "{registry_url}"' if registry_url else ""
    store = f'[store]\nurl = "{store_url}"' if store_url else ""
    limits = f'[limits]\nstore = "{limits_store}"' if limits_store else ""
    path.write_text(f"""{registry}
{store}
{limits}
[model]
path = "{model}"
[server]
{server}
[engine]
backends = {json.dumps(backends)}
max_loras = {max_loras}
max_lora_rank = {max_lora_rank}
[adapters]
dir = "{adapters_dir}"
roots = {json.dumps([str(root) for root in roots])}
eager = {json.dumps(eager)}
[admin]
api_keys = ["{ADMIN_KEY}"]
[tenants.acme]
api_keys = ["{ACME_KEY}"]
adapters = ["caps", "pirate"]
[tenants.globex]
api_keys = ["{GLOBEX_KEY}"]
adapters = ["*"]
max_concurrency = 16
""")
    return path


@dataclass
class GatewayProcess:
    process: subprocess.Popen
    url: str
    log_path: Path

    @classmethod
    def start(cls, config: Path, log_path: Path, timeout_s: float = 600,
              env: dict[str, str] | None = None) -> GatewayProcess:
        """Start it (with `env` as its environment, if given) and wait until its `/health`
        says a backend is up."""
        port = free_port()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [GATEWAY_CLI, "serve", "--config", str(config), "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        gateway = cls(process, f"http://127.0.0.1:{port}", log_path)
        try:
            gateway.wait_healthy(timeout_s)
        except BaseException:
            gateway.stop()
            raise
        return gateway

    def wait_healthy(self, timeout_s: float) -> None:
        if wait_until_ok(self.url + "/health", self.process, timeout_s):
            return
        assert self.process.poll() is None, f"the gateway exited:\n{self.log_tail()}"
        raise AssertionError(f"the gateway was not healthy in {timeout_s:.0f}s:\n"
                             f"{self.log_tail()}")

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"},
                            timeout=300)

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def gateway_home(directory: Path) -> Path:
    """A `$DORA_GATEWAY_HOME` of its own (registry, uploads) whose compiled store is this
    session's, so adapters compiled before are cache hits."""
    directory.mkdir(parents=True, exist_ok=True)
    paths.compiled_store_dir().mkdir(parents=True, exist_ok=True)
    (directory / "compiled").symlink_to(paths.compiled_store_dir(), target_is_directory=True)
    return directory


def running_requests(engine_url: str) -> float:
    """vLLM's own count of requests it is generating for (`vllm:num_requests_running`)."""
    metrics = httpx.get(engine_url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("vllm:num_requests_running"))


def poll_until(condition: Callable[[], bool], failure: str, timeout_s: float = 60) -> None:
    """Poll until `condition` holds; fail with `failure` (rather than hang) after `timeout_s`.
    A probe that times out (a server busy on a loaded machine) counts as not yet."""
    deadline = time.monotonic() + timeout_s
    while not _holds(condition):
        assert time.monotonic() < deadline, failure
        time.sleep(0.1)


def _holds(condition: Callable[[], bool]) -> bool:
    try:
        return condition()
    except httpx.TimeoutException:
        return False


def data_events(lines: Iterator[str]) -> Iterator[str]:
    """The payloads of an SSE stream's `data:` lines, as they arrive."""
    for line in lines:
        if line.startswith("data:"):
            yield line[len("data:"):].strip()


def leave_stream_and_wait_for_abort(gateway: GatewayProcess, engine_url: str, path: str,
                                    body: dict, events: int) -> None:
    """Stream `body` to `path`, leave after `events` data events while vLLM generates, and
    require vLLM to stop generating within a minute (the gateway aborted it)."""
    assert running_requests(engine_url) == 0
    with gateway.client(GLOBEX_KEY) as globex, globex.stream("POST", path, json=body) as stream:
        assert stream.status_code == 200
        received = data_events(stream.iter_lines())
        for _ in range(events):
            next(received)
        assert running_requests(engine_url) == 1
    deadline = time.monotonic() + 60
    while running_requests(engine_url) > 0:
        assert time.monotonic() < deadline, "vLLM kept generating for a client that left"
        time.sleep(0.5)
