"""The plugin's fail-closed rules, on real vLLM layer objects built in this process."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from vllm.config.lora import LoRAConfig
from vllm.lora.layers import (
    ColumnParallelLinearWithLoRA,
    ColumnParallelLinearWithShardedLoRA,
    MergedColumnParallelLinearWithLoRA,
    ReplicatedLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import get_quantization_config

import adapters.vllm_plugin as plugin
from adapters.base_checkpoint import BaseCheckpoint
from adapters.store import CompiledStore
from adapters.vllm_plugin.layers import dora_unsupported_reason
from tests.factories import LLAMA_TARGETS, random_adapter

AWQ = {"bits": 4, "group_size": 64, "zero_point": True, "version": "gemm", "quant_method": "awq"}


def lora_layer(layer_cls, base, fully_sharded: bool = False) -> BaseLinearLayerWithLoRA:
    layer = layer_cls(base)
    layer.create_lora_weights(2, LoRAConfig(max_lora_rank=8, fully_sharded_loras=fully_sharded,
                                            lora_dtype=torch.float32))
    return layer


def test_plain_column_row_and_packed_layers_are_supported(vllm_context):
    assert dora_unsupported_reason(lora_layer(ColumnParallelLinearWithLoRA,
                                              ColumnParallelLinear(64, 128))) is None
    assert dora_unsupported_reason(lora_layer(RowParallelLinearWithLoRA,
                                              RowParallelLinear(128, 64))) is None
    packed = MergedColumnParallelLinear(64, [96, 96])
    assert dora_unsupported_reason(lora_layer(MergedColumnParallelLinearWithLoRA, packed)) is None


def test_quantized_base_layers_are_refused(vllm_context):
    awq = get_quantization_config("awq").from_config(AWQ)
    base = ColumnParallelLinear(64, 128, quant_config=awq, prefix="model.layers.0.q")
    reason = dora_unsupported_reason(lora_layer(ColumnParallelLinearWithLoRA, base))
    assert reason is not None and reason.startswith("quantized base layers")


def test_fully_sharded_lora_is_refused(vllm_context):
    sharded = lora_layer(ColumnParallelLinearWithShardedLoRA, ColumnParallelLinear(64, 128),
                         fully_sharded=True)
    assert "ShardedLoRA" in dora_unsupported_reason(sharded)
    flagged = lora_layer(ColumnParallelLinearWithLoRA, ColumnParallelLinear(64, 128),
                         fully_sharded=True)
    assert dora_unsupported_reason(flagged) == "fully sharded LoRA (--fully-sharded-loras)"


def test_other_lora_layer_kinds_are_refused(vllm_context):
    replicated = lora_layer(ReplicatedLinearWithLoRA, ReplicatedLinear(64, 128))
    assert "ReplicatedLinearWithLoRA layers" in dora_unsupported_reason(replicated)


WITHOUT_PLUGIN = """
import sys
from vllm.config.lora import LoRAConfig
from vllm.lora.peft_helper import PEFTHelper
from vllm.plugins import load_general_plugins
load_general_plugins()
PEFTHelper.from_local_dir(sys.argv[1], None).validate_legal(LoRAConfig(max_lora_rank=8))
"""


def test_without_the_plugin_vllm_refuses_a_compiled_dora_adapter(llama_base, tmp_path):
    """Fail closed: a vLLM that loads every plugin but ours sees `use_dora` and refuses;
    the same vLLM with our plugin accepts the artifact."""
    adapter = random_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8,
                             target_modules=LLAMA_TARGETS, use_dora=True)
    compiled = CompiledStore(tmp_path / "store").compile(adapter, BaseCheckpoint(llama_base))
    command = [sys.executable, "-c", WITHOUT_PLUGIN, str(compiled.path)]
    env = {**os.environ, "VLLM_PLUGINS": "lora_filesystem_resolver"}
    refused = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert refused.returncode != 0
    assert "vLLM does not yet support DoRA" in refused.stderr
    accepted = subprocess.run(command, capture_output=True, text=True, check=False)
    assert accepted.returncode == 0, accepted.stderr


def test_register_refuses_other_vllm_versions(monkeypatch):
    original = BaseLinearLayerWithLoRA._apply_sync
    monkeypatch.setattr(plugin, "_patched", False)
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: "0.31.9")
    plugin.register()
    assert BaseLinearLayerWithLoRA._apply_sync is original
    assert not plugin._patched
