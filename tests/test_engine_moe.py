"""Fail closed on MoE: a DoRA adapter on expert layers is refused at load by a real vLLM.

(vLLM's CPU backend cannot run MoE LoRA forwards here, it needs Triton; the refusal comes
before any forward, and the engine stays healthy.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.engine.process import EngineProcess, EngineSettings
from tests.conftest import TEST_OUTPUT
from tests.engine import load_adapter
from tests.factories import expert_dora_adapter, tiny_mixtral_for_vllm

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def moe_engine(default_model: Path, tmp_path_factory) -> Iterator[EngineProcess]:
    base = tiny_mixtral_for_vllm(tmp_path_factory.mktemp("tiny-moe"), default_model)
    settings = EngineSettings(model=base, max_model_len=512, max_loras=2, max_lora_rank=8)
    with EngineProcess(settings, log_path=TEST_OUTPUT / "vllm-moe.log") as server:
        yield server


def test_dora_on_moe_experts_is_refused_and_the_engine_stays_up(moe_engine, tmp_path):
    response = load_adapter(moe_engine.base_url, "experts", expert_dora_adapter(tmp_path / "a"))
    assert response.status_code >= 400
    message = response.json()["error"]["message"]
    assert "DoRA is not supported on FusedMoEWithLoRA layers" in message
    assert "model.layers.0.block_sparse_moe.experts.0.w1" in message
    assert httpx.get(f"{moe_engine.base_url}/health", timeout=10).status_code == 200
    models = httpx.get(f"{moe_engine.base_url}/v1/models", timeout=10).json()["data"]
    assert "experts" not in [model["id"] for model in models]
