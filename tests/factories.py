"""Tiny random base models and random PEFT adapters, the independent reference in tests.

PEFT initialises B = 0 and m = ||W0|| (so s = 1), which would hide every DoRA bug; the
factories perturb B and m so that every term of the math is exercised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MixtralConfig,
    PreTrainedModel,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(directory: Path, *, bias: bool = False, dtype: torch.dtype = torch.float32,
               hidden_size: int = 64, seed: int = 0) -> Path:
    """A 2-layer random Llama (GQA), optionally with biases on every linear layer."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden_size, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attention_bias=bias, mlp_bias=bias, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(directory)
    return directory


def tiny_gpt2(directory: Path, seed: int = 0) -> Path:
    """A 2-layer random GPT-2: Conv1D layers stored [in, out] (fan_in_fan_out), with biases."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def random_adapter(base_dir: Path, out_dir: Path, *, seed: int = 1, **lora_kwargs) -> Path:
    """Save a PEFT adapter for `base_dir` with non-trivial random B and magnitude."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            elif "lora_magnitude_vector" in name:
                noise = torch.rand(parameter.shape, generator=generator) * 0.4 + 0.8
                parameter.mul_(noise)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load_peft(base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32,
              ) -> PeftModel:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


def load_base(base_dir: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()


def tiny_llama_for_vllm(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama with biases everywhere that vLLM's CPU backend can run
    (head_dim 64) with tensor parallelism 2, borrowing the default model's tokenizer.

    Larger-than-default initialisation keeps its next-token distributions far from uniform,
    so that an adapter's effect on logprobs is large against the test tolerance.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                         max_position_embeddings=512, initializer_range=0.15)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def tiny_mixtral_for_vllm(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random Mixtral (4 experts), saved with per-expert `w1/w2/w3` weights."""
    torch.manual_seed(seed)
    config = MixtralConfig(vocab_size=49152, hidden_size=256, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2,
                           tie_word_embeddings=False, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def expert_dora_adapter(directory: Path, experts: int = 4, size: int = 256, rank: int = 4,
                        ) -> Path:
    """A PEFT-format DoRA adapter on layer 0's MoE experts (the per-expert Linear layout of
    older transformers), written directly: current PEFT targets fused experts differently."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for expert in range(experts):
        for weight in ("w1", "w2", "w3"):
            key = f"base_model.model.model.layers.0.block_sparse_moe.experts.{expert}.{weight}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, size, generator=generator)
            tensors[f"{key}.lora_B.weight"] = torch.randn(size, rank, generator=generator)
            tensors[f"{key}.lora_magnitude_vector"] = torch.rand(size, generator=generator) + 1
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_dora": True,
              "target_modules": ["w1", "w2", "w3"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory
