"""A real vLLM engine on the CPU running the path GPU users get: vLLM's `PunicaWrapperGPU`
(its Triton kernels replaced by the references of `tests/gpu_punica.py`, loaded into the
engine as a vLLM plugin of the tests) after the plugin's scale step, eager and compiled,
serving DoRA, LoRA and base-model requests in one batch as PEFT answers them.

The base is a 2-layer Llama with biases everywhere (the default model's tokenizer), so the
compiled engine compiles in seconds. It gets a compile cache of its own: a graph saved by a
CPU-wrapper engine of the same configuration must not stand in for this one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.engine.process import EngineProcess, EngineSettings
from tests.conftest import TEST_OUTPUT
from tests.engine import LOGPROB_TOLERANCE, complete, max_logprob_gap
from tests.factories import LLAMA_TARGETS, random_adapter, tiny_llama_for_vllm
from tests.gateway_process import poll_until
from tests.gpu_punica import engine_plugin_path

pytestmark = pytest.mark.vllm
PROMPTS = ["The ocean is", "Tell me about the moon."]


@dataclass(frozen=True)
class TinyModels:
    base: Path
    adapters: dict[str, Path]  # name -> PEFT directory


@pytest.fixture(scope="module")
def tiny(default_model: Path, tmp_path_factory) -> TinyModels:
    """A DoRA and a LoRA adapter of different ranks (both below the slots' rank)."""
    root = tmp_path_factory.mktemp("gpu-wrapper-models")
    base = tiny_llama_for_vllm(root / "base", default_model)
    return TinyModels(base, {
        "dora": random_adapter(base, root / "dora", seed=3, r=4, lora_alpha=8,
                               target_modules=LLAMA_TARGETS, use_dora=True),
        "lora": random_adapter(base, root / "lora", seed=4, r=8, lora_alpha=8,
                               target_modules=LLAMA_TARGETS)})


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "compiled"])
def gpu_wrapper_engine(request, tiny: TinyModels, tmp_path_factory) -> Iterator[EngineProcess]:
    home = tmp_path_factory.mktemp("gpu-wrapper-engine")
    python_path = [engine_plugin_path(home / "plugin"), os.environ.get("PYTHONPATH", "")]
    settings = EngineSettings(
        model=tiny.base, served_model_name=str(tiny.base), max_model_len=512, max_loras=2,
        max_lora_rank=16, lora_modules=tiny.adapters, compile=request.param,
        extra_env={"PYTHONPATH": os.pathsep.join(filter(None, python_path)),
                   "VLLM_CACHE_ROOT": str(home / "vllm-cache")})
    mode = "compiled" if request.param else "eager"
    with EngineProcess(settings, log_path=TEST_OUTPUT / f"vllm-gpu-wrapper-{mode}.log") as server:
        yield server


def test_the_engine_runs_vllms_gpu_wrapper(gpu_wrapper_engine):
    log = gpu_wrapper_engine.log_path.read_text(errors="replace")
    assert "Using PunicaWrapperGPU." in log and "PunicaWrapperCPU" not in log
    if gpu_wrapper_engine.settings.compile:
        assert "'mode': <CompilationMode.DYNAMO_TRACE_ONCE" in log
        assert "Directly load AOT compilation" not in log


def test_it_says_adapter_cost_is_not_measured_there(gpu_wrapper_engine, tiny):
    """Host timers cannot time the GPU wrapper's kernels: no figure rather than a false one."""
    complete(gpu_wrapper_engine.base_url, next(iter(tiny.adapters)), PROMPTS[0])
    poll_until(lambda: "adapter cost is not measured with PunicaWrapperGPU"
               in gpu_wrapper_engine.log_path.read_text(errors="replace"),
               "the engine never said that it does not measure adapter cost")
    metrics = httpx.get(gpu_wrapper_engine.base_url + "/metrics", timeout=30).text
    assert "vllm:num_requests_running" in metrics
    assert "dora_engine_" not in metrics


def test_one_batch_of_every_kind_matches_peft(gpu_wrapper_engine, tiny):
    models = {str(tiny.base): None, **tiny.adapters}
    jobs = [(model, prompt) for model in models for prompt in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        completions = list(pool.map(
            lambda job: complete(gpu_wrapper_engine.base_url, *job), jobs))
    for (model, prompt), completion in zip(jobs, completions, strict=True):
        gap = max_logprob_gap(tiny.base, models[model], completion, label=model)
        assert gap < LOGPROB_TOLERANCE, (model, prompt, gap)
