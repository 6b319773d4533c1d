"""The offline default model and the demo adapters on it, against PEFT."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from adapters.base_checkpoint import BaseCheckpoint
from adapters.compile import compile_directory
from adapters.default_model import verification_problem
from tests.compiled_forward import apply_to_model
from tests.factories import load_base, load_peft

DORA_DEMOS = ["caps", "pirate", "brief"]


def chat_tokens(model_dir, question: str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt").input_ids


def test_default_model_is_verified_and_answers(default_model):
    assert verification_problem(default_model) is None
    tokens = chat_tokens(default_model, "What is the capital of France?")
    output = load_base(default_model).generate(tokens, max_new_tokens=12, do_sample=False)
    answer = AutoTokenizer.from_pretrained(default_model).decode(output[0, tokens.shape[1]:])
    assert "Paris" in answer


@pytest.mark.parametrize("name", [*DORA_DEMOS, "caps-lora"])
def test_compiled_demo_adapter_gives_peft_logits(default_model, demo_adapters, name):
    adapter = demo_adapters / name
    compiled = compile_directory(adapter, BaseCheckpoint(default_model))
    assert compiled.is_dora == (name in DORA_DEMOS)
    tokens = chat_tokens(default_model, "Tell me about the sea.")
    with torch.no_grad():
        expected = load_peft(default_model, adapter)(tokens).logits
        actual = apply_to_model(load_base(default_model), compiled)(tokens).logits
        base = load_base(default_model)(tokens).logits
    error = (actual - expected).abs().max().item()
    adapter_effect = (expected - base).abs().max().item()
    assert error < 1e-3 * adapter_effect, (error, adapter_effect)
