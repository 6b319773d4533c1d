"""Fixtures shared by the gateway tests that run against the fake vLLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway_fakes import FakeVllm, make_demo_adapters, make_gateway


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


@pytest.fixture
async def gateway(tmp_path, llama_base, demo, store_dir, vllm):
    """A gateway app over the fake vLLM, per test (modules that need another define theirs)."""
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, vllm)
    yield gateway
    await gateway.pool.aclose()
