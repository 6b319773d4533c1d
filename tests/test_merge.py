"""`merge` against PEFT's `merge_and_unload`, and the merged directory loads in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.errors import DoraGatewayError
from adapters.merge import merge_adapter
from tests.factories import LLAMA_TARGETS, load_base, load_peft, random_adapter

TOLERANCE = 1e-6


def assert_state_dicts_close(merged_dir: Path, expected: dict[str, torch.Tensor]) -> None:
    merged = load_file(merged_dir / "model.safetensors")
    assert set(merged) == {k for k in expected if k in merged} and merged
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, expected[name], rtol=TOLERANCE, atol=TOLERANCE)


@pytest.mark.parametrize("use_dora", [True, False])
def test_merged_weights_equal_peft_merge_and_unload(llama_bias_base, tmp_path, use_dora):
    adapter = random_adapter(llama_bias_base, tmp_path / "a", r=4, lora_alpha=8,
                             target_modules=LLAMA_TARGETS, use_dora=use_dora,
                             rank_pattern={"o_proj": 2})
    merged_dir = merge_adapter(adapter, llama_bias_base, tmp_path / "merged")
    reference = load_peft(llama_bias_base, adapter).merge_and_unload()
    assert_state_dicts_close(merged_dir, reference.state_dict())

    tokens = torch.arange(5, 30).reshape(1, -1)
    with torch.no_grad():
        expected = load_peft(llama_bias_base, adapter)(tokens).logits
        actual = load_base(merged_dir)(tokens).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_merge_fan_in_fan_out_keeps_conv1d_layout(gpt2_base, tmp_path):
    adapter = random_adapter(gpt2_base, tmp_path / "a", r=4, lora_alpha=8, fan_in_fan_out=True,
                             target_modules=["c_attn", "c_fc"], use_dora=True)
    merged_dir = merge_adapter(adapter, gpt2_base, tmp_path / "merged")
    reference = load_peft(gpt2_base, adapter).merge_and_unload().state_dict()
    merged = load_file(merged_dir / "model.safetensors")
    name = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(merged[name], reference[name], rtol=TOLERANCE, atol=TOLERANCE)


def test_merge_refuses_existing_output_and_leaves_nothing_on_failure(llama_base, tmp_path):
    adapter = random_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8,
                             target_modules=LLAMA_TARGETS, use_dora=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(DoraGatewayError, match="already exists"):
        merge_adapter(adapter, llama_base, tmp_path / "taken")
    (adapter / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DoraGatewayError):
        merge_adapter(adapter, llama_base, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "taken"]
