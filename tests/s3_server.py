"""A real S3-compatible server for tests: moto's server mode, in a subprocess on loopback.

moto accepts any credentials until told to check them (`enforcing_auth`, moto's
`/moto-api/reset-auth`); from then on only the IAM access keys created on it are accepted, and
each is held to its IAM policies. So a test meets the server's own refusals: an unknown key
(InvalidAccessKeyId) and a policy that does not allow the request (AccessDenied).

The code under test finds the server the way it finds any store: through the AWS_* environment
(`env`, set for a test by the `s3_env` fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from gateway.engine.process import free_port, wait_until_ok

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkdtemp(prefix="dora-gateway-s3-")) / "moto.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT)
        if not wait_until_ok(f"{self.endpoint}/moto-api/", self.process, START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"moto did not start:\n{self.log_path.read_text()[-4000:]}")

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

    def env(self, access_key: str = "testing", secret_key: str = "testing") -> dict[str, str]:
        """What a client needs to reach this server, and nothing from the host's AWS config
        (`os.devnull` as the config files)."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
                "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self, service: str = "s3") -> Any:
        """A client with the default ("testing") credentials, for a test's own setup and
        checks."""
        return boto3.session.Session().client(
            service, endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing")

    def create_bucket(self, name: str, versioned: bool = False) -> str:
        s3 = self.client()
        s3.create_bucket(Bucket=name)
        if versioned:
            s3.put_bucket_versioning(Bucket=name,
                                     VersioningConfiguration={"Status": "Enabled"})
        return name

    def create_user(self, statements: list[dict[str, Any]]) -> dict[str, str]:
        """An IAM user allowed only `statements` (none: nothing); `env` with its keys."""
        iam = self.client("iam")
        name = f"user-{uuid.uuid4().hex[:12]}"
        iam.create_user(UserName=name)
        if statements:
            document = {"Version": "2012-10-17", "Statement": statements}
            iam.put_user_policy(UserName=name, PolicyName="store",
                                PolicyDocument=json.dumps(document))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return self.env(key["AccessKeyId"], key["SecretAccessKey"])

    @contextlib.contextmanager
    def enforcing_auth(self) -> Iterator[None]:
        """Inside the block, requests are authenticated and authorized for real (the default
        "testing" keys are unknown to it); create users before entering."""
        self._set_auth("0")
        try:
            yield
        finally:
            self._set_auth("inf")

    def _set_auth(self, free_requests: str) -> None:
        response = httpx.post(f"{self.endpoint}/moto-api/reset-auth", content=free_requests,
                              timeout=30)
        response.raise_for_status()


def new_bucket_name() -> str:
    return f"bucket-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """`s3_server`, with this process's AWS_* environment pointing at it (and nothing else:
    the host's own AWS_* settings are removed for the test)."""
    use_server_env(s3_server.env(), monkeypatch)
    return s3_server


def use_server_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
