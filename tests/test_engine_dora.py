"""DoRA served by a real vLLM (CPU, float32) with our plugin, against PEFT.

One engine for the session (`engine` fixture): the demo adapters are given to vLLM's stock
server as plain PEFT directories with `--lora-modules`; more go in at run time.
"""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.engine import (
    LOGPROB_TOLERANCE,
    complete,
    load_adapter,
    max_logprob_gap,
    reference,
    unload_adapter,
)

pytestmark = pytest.mark.vllm
PROMPTS = ["The ocean is", "My favourite food is", "Tell me about the moon.", "Once upon a time"]


def test_mixed_batch_of_dora_lora_and_base_matches_peft(engine, default_model, demo_adapters):
    models = {"base": None, "caps": "caps", "pirate": "pirate", "brief": "brief",
              "caps-lora": "caps-lora"}
    jobs = [(model, prompt) for model in models for prompt in PROMPTS[:2]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: complete(engine.base_url, *job), jobs))
    for (model, _), completion in zip(jobs, results, strict=True):
        adapter = demo_adapters / models[model] if models[model] else None
        gap = max_logprob_gap(default_model, adapter, completion, label=model)
        assert gap < LOGPROB_TOLERANCE, (model, gap)


def test_runtime_loaded_dora_matches_peft(engine, default_model, random_dora_adapters):
    adapter = random_dora_adapters[0]
    response = load_adapter(engine.base_url, "runtime-dora", adapter)
    assert response.status_code == 200, response.text
    completion = complete(engine.base_url, "runtime-dora", PROMPTS[2])
    assert max_logprob_gap(default_model, adapter, completion) < LOGPROB_TOLERANCE


def test_hot_swap_six_adapters_through_two_slots(engine, default_model, random_dora_adapters):
    for index, adapter in enumerate(random_dora_adapters):
        assert load_adapter(engine.base_url, f"swap{index}", adapter).status_code == 200
    order = [0, 3, 1, 4, 2, 5, 0, 5, 3, 1]
    jobs = [(f"swap{i}", PROMPTS[n % len(PROMPTS)]) for n, i in enumerate(order)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda job: complete(engine.base_url, *job), jobs))
    checks = sorted(zip(jobs, results, strict=True), key=lambda check: check[0][0])
    for (model, _), completion in checks:  # by adapter: one PEFT reference at a time
        adapter = random_dora_adapters[int(model.removeprefix("swap"))]
        assert max_logprob_gap(default_model, adapter, completion) < LOGPROB_TOLERANCE, model


def test_reloading_a_name_serves_the_new_weights(engine, default_model, random_dora_adapters):
    first, second = random_dora_adapters[1], random_dora_adapters[2]
    assert load_adapter(engine.base_url, "reloaded", first).status_code == 200
    before = complete(engine.base_url, "reloaded", PROMPTS[0])
    assert max_logprob_gap(default_model, first, before) < LOGPROB_TOLERANCE
    logged_before = engine.log_path.stat().st_size
    assert unload_adapter(engine.base_url, "reloaded").status_code == 200
    with engine.log_path.open("rb") as log:
        log.seek(logged_before)
        logged = log.read().decode(errors="replace")
    freed = re.findall(r"engine LoRA slot of 'reloaded' \(id \d+\) freed: (\w+)", logged)
    assert freed == ["True"], "the unload must free the engine's slot, not only the name"
    assert load_adapter(engine.base_url, "reloaded", second).status_code == 200
    after = complete(engine.base_url, "reloaded", PROMPTS[0])
    assert max_logprob_gap(default_model, second, after) < LOGPROB_TOLERANCE


def without_magnitude(adapter: Path, out: Path) -> Path:
    """The same A and B as plain LoRA: DoRA served without its magnitude."""
    out.mkdir()
    tensors = {k: v for k, v in load_file(adapter / "adapter_model.safetensors").items()
               if "magnitude" not in k}
    save_file(tensors, out / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    return out


def test_dora_served_as_plain_lora_is_shown_to_differ(engine, default_model,
                                                      random_dora_adapters, tmp_path):
    adapter = random_dora_adapters[3]
    as_lora = without_magnitude(adapter, tmp_path / "as-lora")
    assert load_adapter(engine.base_url, "as-lora", as_lora).status_code == 200
    completion = complete(engine.base_url, "as-lora", PROMPTS[1])
    assert max_logprob_gap(default_model, as_lora, completion) < LOGPROB_TOLERANCE
    _, dora_logprobs = reference(default_model, adapter, completion)
    worst = max(abs(a - b) for a, b in zip(completion.logprobs, dora_logprobs, strict=True))
    assert worst > 100 * LOGPROB_TOLERANCE


def test_dora_on_lm_head_is_refused_at_load(engine, default_model, tmp_path):
    from tests.factories import random_adapter

    adapter = random_adapter(default_model, tmp_path / "head", r=4, lora_alpha=8,
                             target_modules=["q_proj", "lm_head"], use_dora=True)
    response = load_adapter(engine.base_url, "head", adapter)
    assert response.status_code >= 400
    assert "DoRA on embeddings or lm_head is not supported" in response.text
    names = [m["id"] for m in engine_models(engine.base_url)]
    assert "head" not in names


def engine_models(base_url: str) -> list[dict]:
    import httpx

    return httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"]


def test_broken_adapter_is_refused_with_every_problem(engine, random_dora_adapters, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(random_dora_adapters[4], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True,
                                                            "modules_to_save": ["x"]}))
    response = load_adapter(engine.base_url, "broken", broken)
    assert response.status_code >= 400
    assert "lora_bias" in response.text and "modules_to_save" in response.text


def test_plain_lora_on_lm_head_is_served_as_peft(engine, default_model, tmp_path):
    """The logits' LoRA step, skipped while no slot holds lm_head weights, runs when one
    does."""
    from tests.factories import random_adapter

    adapter = random_adapter(default_model, tmp_path / "head-lora", r=4, lora_alpha=8,
                             target_modules=["q_proj", "lm_head"])
    assert load_adapter(engine.base_url, "head-lora", adapter).status_code == 200
    completion = complete(engine.base_url, "head-lora", PROMPTS[3])
    assert max_logprob_gap(default_model, adapter, completion) < LOGPROB_TOLERANCE
