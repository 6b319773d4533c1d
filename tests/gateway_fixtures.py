"""Fixtures shared by the gateway tests that run against the fake vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway_fakes import FakeVllm, make_demo_adapters


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def demo(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_adapters(llama_base, tmp_path_factory.mktemp("gateway-adapters"))


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-store")


@pytest.fixture
def vllm() -> FakeVllm:
    return FakeVllm()
