"""The compiled math against PEFT's DoRA layers, layer by layer and whole model, float32."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adapters.base_checkpoint import BaseCheckpoint
from adapters.compile import compile_directory
from adapters.compiled import CompiledAdapter
from adapters.dora import apply_compiled
from tests.compiled_forward import apply_to_model
from tests.factories import LLAMA_TARGETS, load_base, load_peft, random_adapter

RELATIVE_TOLERANCE = 1e-5

VARIANTS = {
    "dora": dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True),
    "dora-rslora": dict(r=8, lora_alpha=4, target_modules=LLAMA_TARGETS, use_dora=True,
                        use_rslora=True),
    "dora-patterns": dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True,
                          rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                          alpha_pattern={"down_proj": 3, "v_proj": 32}),
    "lora": dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=False),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def layer_errors(base_dir: Path, adapter_dir: Path, compiled: CompiledAdapter) -> dict[str, float]:
    """Relative error of `apply_compiled` against PEFT's adapted layer, per module."""
    peft_model = load_peft(base_dir, adapter_dir)
    base = BaseCheckpoint(base_dir)
    fan_in_fan_out = peft_model.peft_config["default"].fan_in_fan_out
    errors = {}
    torch.manual_seed(0)
    for module, layer in compiled.modules.items():
        peft_layer = peft_model.base_model.model.get_submodule(module)
        w0 = base.tensor(f"{module}.weight").float()
        w0 = w0.T if fan_in_fan_out else w0
        bias = base.tensor(f"{module}.bias").float() if base.has(f"{module}.bias") else None
        x = torch.randn(5, w0.shape[1])
        with torch.no_grad():
            expected = peft_layer(x)
        actual = apply_compiled(x, w0, bias, layer.lora_a, layer.fused_b, layer.scale)
        errors[module] = relative_error(actual, expected)
    return errors


def logits_error(base_dir: Path, adapter_dir: Path, compiled: CompiledAdapter) -> float:
    tokens = torch.arange(3, 40).reshape(1, -1) % 128
    with torch.no_grad():
        expected = load_peft(base_dir, adapter_dir)(tokens).logits
        actual = apply_to_model(load_base(base_dir), compiled)(tokens).logits
    return relative_error(actual, expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("base_fixture", ["llama_base", "llama_bias_base"])
def test_layers_and_logits_match_peft(variant, base_fixture, request, tmp_path):
    base_dir = request.getfixturevalue(base_fixture)
    adapter_dir = random_adapter(base_dir, tmp_path / "adapter", **VARIANTS[variant])
    compiled = compile_directory(adapter_dir, BaseCheckpoint(base_dir))

    errors = layer_errors(base_dir, adapter_dir, compiled)
    assert len(errors) == 2 * len(LLAMA_TARGETS)
    assert max(errors.values()) < RELATIVE_TOLERANCE, errors
    assert logits_error(base_dir, adapter_dir, compiled) < RELATIVE_TOLERANCE


def test_rank_and_alpha_patterns_are_honoured(llama_base, tmp_path):
    adapter_dir = random_adapter(llama_base, tmp_path / "a", **VARIANTS["dora-patterns"])
    modules = compile_directory(adapter_dir, BaseCheckpoint(llama_base)).modules
    assert modules["model.layers.0.self_attn.q_proj"].lora_a.shape[0] == 2
    assert modules["model.layers.1.mlp.up_proj"].lora_a.shape[0] == 6
    assert modules["model.layers.0.mlp.up_proj"].lora_a.shape[0] == 4


def test_fan_in_fan_out_conv1d_with_bias_matches_peft(gpt2_base, tmp_path):
    adapter_dir = random_adapter(gpt2_base, tmp_path / "adapter", r=4, lora_alpha=8,
                                 target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True,
                                 fan_in_fan_out=True)
    compiled = compile_directory(adapter_dir, BaseCheckpoint(gpt2_base))
    errors = layer_errors(gpt2_base, adapter_dir, compiled)
    assert len(errors) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 layers
    assert max(errors.values()) < RELATIVE_TOLERANCE, errors
    assert logits_error(gpt2_base, adapter_dir, compiled) < RELATIVE_TOLERANCE


def test_bfloat16_base_norm_uses_stored_weights(llama_bf16_base, tmp_path):
    """A bf16 checkpoint: s comes from its stored weights, PEFT's float32 model agrees."""
    adapter_dir = random_adapter(llama_bf16_base, tmp_path / "a", **VARIANTS["dora"])
    compiled = compile_directory(adapter_dir, BaseCheckpoint(llama_bf16_base))
    assert max(layer_errors(llama_bf16_base, adapter_dir, compiled).values()) < RELATIVE_TOLERANCE


def test_negative_control_magnitude_ignored_is_caught(llama_base, tmp_path):
    """Serving a DoRA adapter as plain LoRA (s dropped) must fail the same parity check."""
    adapter_dir = random_adapter(llama_base, tmp_path / "adapter", **VARIANTS["dora"])
    compiled = compile_directory(adapter_dir, BaseCheckpoint(llama_base))
    as_lora = replace(compiled, modules={
        name: replace(layer, scale=None, fused_b=layer.fused_b / layer.scale[:, None])
        for name, layer in compiled.modules.items()
    })
    assert min(layer_errors(llama_base, adapter_dir, as_lora).values()) > 1e-3
    assert logits_error(llama_base, adapter_dir, as_lora) > 1e-3
