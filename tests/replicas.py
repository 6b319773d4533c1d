"""vLLM replicas on one host, as tests and benchmarks/replicas.py start them.

Each replica listens on its own loopback address with the same port (127.0.0.1 and 127.0.0.2
both reach this host), so one DNS name that resolves to both addresses stands for both, as a
Kubernetes headless Service does; each is pinned to its own core.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

from gateway.engine.process import EngineProcess, EngineSettings, free_port

HOSTS = ("127.0.0.1", "127.0.0.2")


class PinnedEngine(EngineProcess):
    """A vLLM server confined to one core (`taskset`), its worker threads bound there too."""

    def __init__(self, settings: EngineSettings, log_path: Path, port: int, host: str,
                 cpu: int) -> None:
        settings.extra_env = {**settings.extra_env, "VLLM_CPU_OMP_THREADS_BIND": str(cpu)}
        super().__init__(settings, log_path, port=port, host=host)
        self.cpu = cpu

    def command(self) -> list[str]:
        return ["taskset", "-c", str(self.cpu), *super().command()]

    def kill(self) -> None:
        """Die as a crashed server does: no shutdown, every process of it at once; returns
        once the server is gone (its connections closed)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def port_free_on_both() -> int:
    while True:
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as probe:
            probe.bind((HOSTS[1], port))
            return port


@contextlib.contextmanager
def running_replicas(settings: EngineSettings, log_dir: Path,
                     name: str) -> Iterator[list[PinnedEngine]]:
    """Two replicas with `settings` (logs `log_dir/NAME-I.log`), started together."""
    port = port_free_on_both()
    engines = [PinnedEngine(EngineSettings(**vars(settings)), log_dir / f"{name}-{index}.log",
                            port, host, index % os.cpu_count())
               for index, host in enumerate(HOSTS)]
    try:
        for engine in engines:
            engine.start()
        for engine in engines:
            engine.wait_ready()
        yield engines
    finally:
        for engine in engines:
            engine.stop()
