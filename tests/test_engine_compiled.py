"""vLLM's compiled mode with LoRA on (traced once by Dynamo, compiled by inductor): DoRA,
LoRA and base-model requests, alone and in one batch, against PEFT and the eager engine.

vLLM 0.32's CPU platform refuses to compile with LoRA on; the plugin lifts that with
`DORA_GATEWAY_CPU_COMPILE=1` (`EngineSettings.compile`), since its CPU LoRA path is
trace-safe. This is the same kind of graph vLLM builds on a GPU (minus CUDA graphs): one
trace, no guards, replayed for every later batch, so a layer that read stale batch state
would answer for the wrong adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gateway.engine.process import EngineProcess, EngineSettings
from tests.conftest import TEST_OUTPUT
from tests.engine import LOGPROB_TOLERANCE, complete, load_adapter, max_logprob_gap
from tests.factories import random_adapter

pytestmark = pytest.mark.vllm
MODELS = {"base": None, "caps": "caps", "pirate": "pirate", "caps-lora": "caps-lora"}
PROMPTS = ["The ocean is", "Tell me about the moon.", "Once upon a time"]


@pytest.fixture(scope="module")
def compiled_engine(default_model: Path, demo_adapters: Path) -> Iterator[EngineProcess]:
    """Two LoRA slots for three adapters, so slots are swapped under the traced graph."""
    settings = EngineSettings(
        model=default_model, max_loras=2, max_cpu_loras=3, max_lora_rank=16,
        lora_modules={name: demo_adapters / name for name in MODELS if name != "base"},
        compile=True)
    with EngineProcess(settings, log_path=TEST_OUTPUT / "vllm-compiled.log") as server:
        yield server


def test_the_engine_runs_compiled_with_lora(compiled_engine):
    log = compiled_engine.log_path.read_text(errors="replace")
    assert "'enable_lora': True" in log
    assert "'mode': <CompilationMode.DYNAMO_TRACE_ONCE" in log
    assert "Warming up model for the compilation" in log


def adapter_of(demo_adapters: Path, model: str) -> Path | None:
    return demo_adapters / MODELS[model] if MODELS[model] else None


def test_each_model_alone_matches_peft(compiled_engine, default_model, demo_adapters):
    for model in MODELS:
        completion = complete(compiled_engine.base_url, model, PROMPTS[0])
        gap = max_logprob_gap(default_model, adapter_of(demo_adapters, model), completion,
                              label=model)
        assert gap < LOGPROB_TOLERANCE, (model, gap)


def test_one_batch_of_every_kind_matches_peft_and_the_eager_engine(
        compiled_engine, engine, default_model, demo_adapters):
    jobs = [(model, prompt) for model in MODELS for prompt in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        compiled = list(pool.map(lambda job: complete(compiled_engine.base_url, *job), jobs))
        eager = list(pool.map(lambda job: complete(engine.base_url, *job), jobs))
    for (model, prompt), got, want in zip(jobs, compiled, eager, strict=True):
        assert got.token_ids == want.token_ids, (model, prompt)
        assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs, strict=True)) \
            < LOGPROB_TOLERANCE, (model, prompt)
        gap = max_logprob_gap(default_model, adapter_of(demo_adapters, model), got,
                              label=model)
        assert gap < LOGPROB_TOLERANCE, (model, prompt, gap)


def test_lora_on_lm_head_is_refused_when_compiled(compiled_engine, default_model, tmp_path):
    """vLLM's CPU embedding/logits LoRA ops are not trace-safe: fail closed."""
    adapter = random_adapter(default_model, tmp_path / "head-lora", r=4, lora_alpha=8,
                             target_modules=["q_proj", "lm_head"])
    response = load_adapter(compiled_engine.base_url, "head-lora", adapter)
    assert response.status_code >= 400
    assert "not supported by vLLM's compiled mode on the CPU" in response.text


def test_a_second_start_loads_the_compiled_model_and_answers_as_peft(
        compiled_engine, default_model, demo_adapters):
    """vLLM saved the model `compiled_engine` compiled (or loaded); the same engine started
    again must load it rather than compile again (vLLM 0.32 alone fails that load on the
    CPU), and the loaded graph must still read the live adapter weights and batch plan."""
    log_path = TEST_OUTPUT / "vllm-compiled-again.log"
    with EngineProcess(compiled_engine.settings, log_path=log_path) as again, \
            ThreadPoolExecutor(len(MODELS)) as pool:
        completions = list(pool.map(lambda model: complete(again.base_url, model, PROMPTS[1]),
                                    MODELS))
    log = log_path.read_text(errors="replace")
    assert "Directly load AOT compilation" in log and "Compiling model again" not in log
    for model, completion in zip(MODELS, completions, strict=True):
        gap = max_logprob_gap(default_model, adapter_of(demo_adapters, model), completion,
                              label=model)
        assert gap < LOGPROB_TOLERANCE, (model, gap)
