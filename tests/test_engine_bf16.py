"""DoRA served in bfloat16, the dtype of real GPU deployments, against PEFT in bfloat16.

In bf16 neither side is exact, so the yardstick is the base model's own gap: vLLM's base
model against transformers' on the same prompts and tokens (about 0.14 nats at worst here).
DoRA's gap to PEFT must be within a small factor of it, and the same bound must catch a
wrong adapter: `caps`'s tokens against the base model. (Dropping the magnitude is not the
control: for the all-capitals `caps` of an earlier recipe the bound could not tell it apart
on these prompts, 0.149 against a base gap of 0.136; the magnitude's effect is proven
exactly in float32 by `test_engine_dora.py`.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gateway.engine.process import EngineProcess, EngineSettings
from tests.conftest import TEST_OUTPUT
from tests.engine import Completion, complete, reference

pytestmark = pytest.mark.vllm
PROMPTS = ["The ocean is", "My favourite food is", "Tell me about the moon.",
           "Once upon a time"]
ROUNDING_FACTOR = 1.5  # DoRA adds two rounded ops a layer over the base model


@pytest.fixture(scope="module")
def bf16_engine(default_model: Path, demo_adapters: Path) -> Iterator[EngineProcess]:
    settings = EngineSettings(model=default_model, dtype="bfloat16", max_loras=2,
                              max_lora_rank=16,
                              lora_modules={"caps": demo_adapters / "caps",
                                            "caps-lora": demo_adapters / "caps-lora"})
    with EngineProcess(settings, log_path=TEST_OUTPUT / "vllm-bf16.log") as server:
        yield server


def logprob_gap(base: Path, adapter: Path | None, completions: list[Completion]) -> float:
    """Largest |engine - reference| logprob of the engine's own tokens, the reference run
    in bf16 (teacher-forced: bf16 greedy paths may part)."""
    gaps = []
    for completion in completions:
        _, logprobs = reference(base, adapter, completion, dtype=torch.bfloat16)
        gaps += [abs(a - b) for a, b in zip(completion.logprobs, logprobs, strict=True)]
    return max(gaps)


def test_dora_in_bf16_is_as_close_to_peft_as_the_base_model_is(
        bf16_engine, default_model, demo_adapters):
    served = {model: [complete(bf16_engine.base_url, model, p) for p in PROMPTS]
              for model in ("base", "caps", "caps-lora")}
    base_gap = logprob_gap(default_model, None, served["base"])
    caps = demo_adapters / "caps"
    dora_gap = logprob_gap(default_model, caps, served["caps"])
    lora_gap = logprob_gap(default_model, demo_adapters / "caps-lora", served["caps-lora"])
    tolerance = ROUNDING_FACTOR * base_gap
    assert dora_gap <= tolerance, (dora_gap, base_gap)
    assert lora_gap <= tolerance, (lora_gap, base_gap)
    assert logprob_gap(default_model, None, served["caps"]) > tolerance
