"""A merged model directory (`dora-gateway merge`) served by a real vLLM equals PEFT."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.merge import merge_adapter
from gateway.engine.process import EngineProcess, EngineSettings
from tests.conftest import TEST_OUTPUT
from tests.engine import LOGPROB_TOLERANCE, complete, max_logprob_gap

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def merged_caps(default_model: Path, demo_adapters: Path, tmp_path_factory) -> Path:
    return merge_adapter(demo_adapters / "caps", default_model,
                         tmp_path_factory.mktemp("merged") / "caps")


@pytest.fixture(scope="module")
def merged_engine(merged_caps: Path) -> Iterator[EngineProcess]:
    settings = EngineSettings(model=merged_caps, served_model_name="merged", max_model_len=512)
    with EngineProcess(settings, log_path=TEST_OUTPUT / "vllm-merged.log") as server:
        yield server


def test_vllm_serves_the_merged_model_like_peft_serves_the_adapter(
        merged_engine, default_model, demo_adapters):
    completion = complete(merged_engine.base_url, "merged", "What is the capital of France?", 12)
    assert max_logprob_gap(default_model, demo_adapters / "caps", completion) < LOGPROB_TOLERANCE
