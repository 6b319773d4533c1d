"""vLLM's real linear LoRA layers outside an engine: built, filled and mapped by hand.

For tests and benchmarks of the plugin's layer op without a model runner. Slot 0 is meant for
a LoRA adapter and slot 1 for a DoRA adapter; a batch is given as one slot (or None, the base
model) per token, as a decode batch (one token per sequence).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.config.lora import LoRAConfig
from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment
from vllm.lora.layers import LoRAMapping
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.punica_wrapper import get_punica_wrapper
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.lora.utils import from_layer
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

from adapters.vllm_plugin.layers import set_scale
from gateway.engine.process import free_port

LORA_SLOT, DORA_SLOT = 0, 1
SLOTS = 2  # the default; the adapter in slot i has vLLM's id i + 1 (0 means "no adapter")


@dataclass(frozen=True)
class BlockShapes:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


@contextmanager
def single_process_vllm() -> Iterator[None]:
    """What vLLM's layers need outside an engine: a config and a one-rank process group."""
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        ensure_model_parallel_initialized(1, 1)
        yield


def base_block(shapes: BlockShapes, bias: bool) -> dict[str, tuple[torch.nn.Module, list[str]]]:
    """The block's linear layers with the sub-modules packed into each (vLLM's naming)."""
    s = shapes
    return {
        "qkv_proj": (QKVParallelLinear(s.hidden, s.head_dim, s.heads, s.kv_heads, bias=bias),
                     ["q_proj", "k_proj", "v_proj"]),
        "o_proj": (RowParallelLinear(s.heads * s.head_dim, s.hidden, bias=bias), ["o_proj"]),
        "gate_up_proj": (MergedColumnParallelLinear(s.hidden, [s.intermediate] * 2, bias=bias),
                         ["gate_proj", "up_proj"]),
        "down_proj": (RowParallelLinear(s.intermediate, s.hidden, bias=bias), ["down_proj"]),
    }


@dataclass
class LoRABlock:
    """vLLM LoRA layers by name, the punica wrapper they all read, and each base layer's
    weight and bias as created (vLLM's CPU GEMM repacks the weight and drops the original)."""

    layers: dict[str, BaseLinearLayerWithLoRA]
    wrapper: PunicaWrapperBase
    base_weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def lora_block(shapes: BlockShapes, rank: int, max_tokens: int, generator: torch.Generator,
               bias: bool = False, config: LoRAConfig | None = None,
               wrapper: PunicaWrapperBase | None = None) -> LoRABlock:
    """The block as vLLM's LoRA layers (`config`'s slots, two by default) around base layers
    with random weights, prepared for the forward as vLLM's model loader does; `wrapper`
    defaults to the platform's punica wrapper."""
    config = config or LoRAConfig(max_lora_rank=rank, max_loras=SLOTS, lora_dtype=torch.float32)
    wrapper = wrapper or get_punica_wrapper(max_tokens, max_batches=max_tokens, device="cpu",
                                            max_loras=config.max_loras)
    block = LoRABlock({}, wrapper, {})
    for name, (base, packed) in base_block(shapes, bias).items():
        with torch.no_grad():  # vLLM allocates with torch.empty: garbage, even NaN, otherwise
            for parameter in base.parameters():
                parameter.normal_(0, 0.02, generator=generator)
        block.base_weights[name] = (base.weight.detach().clone(),
                                    None if base.bias is None else base.bias.detach().clone())
        base.quant_method.process_weights_after_loading(base)
        layer = from_layer(base, config.max_loras, config, packed)
        layer.set_mapping(block.wrapper)
        block.layers[name] = layer
    return block


def random_slot_weights(layer: BaseLinearLayerWithLoRA, rank: int, generator: torch.Generator,
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per sub-module A [rank, in], B [out_i, rank] and a DoRA scale s [out_i] near 1."""
    a = [torch.randn(rank, layer.input_size, generator=generator) / layer.input_size ** 0.5
         for _ in layer.output_slices]
    b = [torch.randn(out, rank, generator=generator) * 0.01 for out in layer.output_slices]
    s = [1 + 0.05 * torch.randn(out, generator=generator) for out in layer.output_slices]
    return a, b, s


def load_slot(layer: BaseLinearLayerWithLoRA, slot: int, a: list[torch.Tensor],
              b: list[torch.Tensor], scales: list[torch.Tensor] | None) -> None:
    """Fill a slot as vLLM's manager and the plugin do when an adapter is activated."""
    layer.reset_lora(slot)
    layer.set_lora(slot, a if layer.n_slices > 1 else a[0], b if layer.n_slices > 1 else b[0])
    if scales is not None:
        set_scale(layer, slot, scales)


def select_batch(wrapper: PunicaWrapperBase, slots: list[int | None],
                 is_prefill: bool = False, max_loras: int = SLOTS) -> None:
    """Map a batch, one slot (None: the base model, and padding) per token, as vLLM does
    before a forward, with every slot's adapter active; the plugin writes its batch plan
    from punica's metadata."""
    ids = [0 if slot is None else slot + 1 for slot in slots]
    wrapper.update_metadata(LoRAMapping(ids, ids, is_prefill=is_prefill),
                            [slot + 1 for slot in range(max_loras)], max_loras,
                            vocab_size=32000)
