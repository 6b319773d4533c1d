"""A real Redis server for tests (Debian's `redis-server`), on 127.0.0.1 on a free port, without
persistence, in a temporary directory; one for the whole session (`redis_server`)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.engine.process import free_port

START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
POLL_INTERVAL_S = 0.05


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = Path(tempfile.mkdtemp(prefix="dora-gateway-redis-"))
        self.log_path = self.directory / "redis.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        program = shutil.which("redis-server")
        assert program, "redis-server is not installed: `make test-tools` (scripts/test_tools.sh)"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [program, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        if not self._wait_until_answering(self.process):
            self.stop()
            raise RuntimeError(f"redis-server did not start:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def flush(self) -> None:
        """Forget every counter: a test that starts gateways on this server starts afresh."""
        with redis.Redis.from_url(self.url, socket_timeout=5) as client:
            client.flushall()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _wait_until_answering(self, process: subprocess.Popen) -> bool:
        """Polls PING until it answers (True), the process exits or START_TIMEOUT_S passes."""
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1,
                                      retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    return bool(client.ping())
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(POLL_INTERVAL_S)
            return False
        finally:
            client.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.remove()
