"""DoRA with biases on every layer and tensor parallelism 2, in a real vLLM, against PEFT.

vLLM's CPU backend runs TP=2 here with one core per rank. The scale of a column-parallel
layer is sharded like its B (by the layer's own `slice_lora_b`); a row-parallel layer scales
each rank's partial sum before the all-reduce, and only rank 0 adds the bias.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.engine.process import EngineProcess, EngineSettings
from tests.conftest import TEST_OUTPUT
from tests.engine import LOGPROB_TOLERANCE, complete, max_logprob_gap, reference
from tests.factories import LLAMA_TARGETS, random_adapter, tiny_llama_for_vllm
from tests.test_engine_dora import without_magnitude

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tiny_base(default_model: Path, tmp_path_factory) -> Path:
    return tiny_llama_for_vllm(tmp_path_factory.mktemp("tiny-bias"), default_model)


@pytest.fixture(scope="module")
def tiny_dora(tiny_base: Path, tmp_path_factory) -> Path:
    return random_adapter(tiny_base, tmp_path_factory.mktemp("tiny-dora") / "a", seed=2, r=4,
                          lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True)


@pytest.fixture(scope="module")
def tp2_engine(tiny_base: Path, tiny_dora: Path) -> Iterator[EngineProcess]:
    settings = EngineSettings(model=tiny_base, max_model_len=512, max_loras=2, max_lora_rank=8,
                              served_model_name=str(tiny_base), lora_modules={"dora": tiny_dora},
                              extra_args=["--tensor-parallel-size", "2"],
                              extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    with EngineProcess(settings, log_path=TEST_OUTPUT / "vllm-tp2.log") as server:
        yield server


def test_dora_with_biases_under_tp2_matches_peft(tp2_engine, tiny_base, tiny_dora, tmp_path):
    for prompt in ("The ocean is", "Once upon a time"):
        completion = complete(tp2_engine.base_url, "dora", prompt)
        assert max_logprob_gap(tiny_base, tiny_dora, completion) < LOGPROB_TOLERANCE
        base = complete(tp2_engine.base_url, str(tiny_base), prompt)
        assert max_logprob_gap(tiny_base, None, base) < LOGPROB_TOLERANCE

    as_lora = without_magnitude(tiny_dora, tmp_path / "as-lora")
    _, lora_logprobs = reference(tiny_base, as_lora, completion)
    worst = max(abs(a - b) for a, b in zip(completion.logprobs, lora_logprobs, strict=True))
    assert worst > 100 * LOGPROB_TOLERANCE
