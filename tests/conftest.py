"""Shared fixtures: the prepared default model, tiny random base models, and the real vLLM
and gateway that engine tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from adapters import paths
from adapters.default_model import prepare_default_model
from gateway.engine.process import EngineProcess, EngineSettings
from tests.factories import LLAMA_TARGETS, random_adapter, tiny_gpt2, tiny_llama
from tests.gateway_process import GatewayProcess, write_config
from tests.vllm_layers import single_process_vllm

pytest_plugins = ["tests.gateway_fixtures", "tests.s3_server", "tests.hub_cache",
                  "tests.redis_server"]

DEMO_ADAPTERS = ("caps", "pirate", "brief", "caps-lora")
TEST_OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The default model (prepared by `make test` before pytest; verified here)."""
    return prepare_default_model(paths.default_model_dir())


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def llama_bias_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama-bias"), bias=True)


@pytest.fixture(scope="session")
def llama_bf16_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama-bf16"), dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def vllm_context() -> Iterator[None]:
    """vLLM's config and a one-rank process group, for building its layers in this process."""
    with single_process_vllm():
        yield


@pytest.fixture(scope="session")
def demo_adapters() -> Path:
    return paths.demo_adapters_dir()


@pytest.fixture(scope="session")
def random_dora_adapters(default_model: Path, tmp_path_factory) -> list[Path]:
    """Six random DoRA adapters on the default model, each with its own rank and seed."""
    root = tmp_path_factory.mktemp("random-dora")
    return [random_adapter(default_model, root / f"dora{seed}", seed=seed, r=4 + 2 * (seed % 3),
                           lora_alpha=16, target_modules=LLAMA_TARGETS, use_dora=True)
            for seed in range(6)]


@pytest.fixture(scope="session")
def engine(default_model: Path, demo_adapters: Path, tmp_path_factory) -> Iterator[EngineProcess]:
    """One real vLLM server (with our plugin) for the whole session: two LoRA slots, so
    more adapters than slots are in use and vLLM swaps them."""
    settings = EngineSettings(
        model=default_model, max_loras=2, max_cpu_loras=3, max_lora_rank=16,
        lora_modules={name: demo_adapters / name for name in DEMO_ADAPTERS})
    server = EngineProcess(settings, log_path=TEST_OUTPUT / "vllm-engine.log")
    with server:
        yield server


@pytest.fixture(scope="session")
def gateway_root(tmp_path_factory) -> Path:
    """A directory admins may add adapters from (beside the demo adapters directory)."""
    return tmp_path_factory.mktemp("gateway-root")


@pytest.fixture(scope="session")
def real_gateway(engine: EngineProcess, default_model: Path, demo_adapters: Path,
                 gateway_root: Path, tmp_path_factory) -> Iterator[GatewayProcess]:
    """`dora-gateway serve` in front of the session's vLLM. vLLM already serves the demo
    adapters under their own names; the gateway loads them again under its internal names,
    so a test can send one request both ways and compare."""
    config = write_config(tmp_path_factory.mktemp("gateway") / "gateway.toml",
                          model=default_model, adapters_dir=demo_adapters,
                          roots=[gateway_root], backends=[engine.base_url])
    gateway = GatewayProcess.start(config, TEST_OUTPUT / "gateway.log")
    yield gateway
    gateway.stop()
