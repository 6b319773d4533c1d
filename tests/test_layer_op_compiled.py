"""The plugin's layer op under vLLM's compiled mode: traced once, every guard dropped.

vLLM traces the model with Dynamo once and never checks the trace's assumptions again (and a
CUDA graph replays the addresses it captured). So the op is traced here on one kind of batch
and then run on every other kind, each checked token by token against
    y_t = s_t * (W0 x_t) + B_t (A_t x_t) + b
and every tensor the op reads must keep its storage across new batches and adapter swaps.
"""

from __future__ import annotations

import pytest
import torch

from adapters.vllm_plugin.layers import _scale_base_output, plan_of
from tests.test_layer_op import BATCHES, RANK, expected, filled_block
from tests.vllm_layers import (
    DORA_SLOT,
    LORA_SLOT,
    load_slot,
    random_slot_weights,
    select_batch,
)

PREFILL = [None, None, DORA_SLOT, DORA_SLOT, DORA_SLOT, LORA_SLOT, LORA_SLOT, None]
ALL_BATCHES = {**BATCHES, "prefill with base tokens": PREFILL}


def compile_without_guards(function, backend: str = "eager"):
    """As vLLM's compiled mode: one full graph, dynamic token count, no guard ever checked."""
    return torch.compile(function, fullgraph=True, dynamic=False, backend=backend,
                         options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})


@pytest.fixture(scope="module")
def block(vllm_context):
    return filled_block(seed=3, max_tokens=16)


def block_forward(layers):
    def forward(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x)[0] for layer, x in zip(layers, inputs, strict=True)]
    return forward


def batch_inputs(block, slots, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(len(slots), layer.input_size, generator=generator)
              for layer in block.layers.values()]
    for x in inputs:
        torch._dynamo.mark_dynamic(x, 0)
    return inputs


def check_batch(block, weights, forward, batch: str, seed: int) -> None:
    slots = ALL_BATCHES[batch]
    select_batch(block.wrapper, slots, is_prefill=batch.startswith("prefill"))
    inputs = batch_inputs(block, slots, seed)
    for (name, _), x, output in zip(block.layers.items(), inputs, forward(inputs), strict=True):
        torch.testing.assert_close(output, expected(x, slots, *weights[name]),
                                   rtol=1e-5, atol=1e-6, msg=f"{name}, {batch}")


@pytest.mark.parametrize("traced_on", ALL_BATCHES)
def test_traced_once_serves_every_other_batch(block, traced_on):
    block, weights = block
    torch._dynamo.reset()
    forward = compile_without_guards(block_forward(list(block.layers.values())))
    check_batch(block, weights, forward, traced_on, seed=0)
    for seed, batch in enumerate(ALL_BATCHES, start=1):
        check_batch(block, weights, forward, batch, seed)


def test_inductor_graph_serves_every_batch(block):
    """The CPU platform's own backend: inductor code around the opaque LoRA op."""
    block, weights = block
    torch._dynamo.reset()
    forward = compile_without_guards(block_forward(list(block.layers.values())), "inductor")
    for seed, batch in enumerate(["mixed", *ALL_BATCHES]):
        check_batch(block, weights, forward, batch, seed)


def read_tensors(block) -> dict[str, int]:
    """Storage address of every tensor the layer op reads."""
    plan = plan_of(next(iter(block.layers.values())))
    addresses = {f"plan.{name}": getattr(plan, name).data_ptr()
                 for name in ("rows", "order")}
    for name, layer in block.layers.items():
        for attribute in ("slot_a", "slot_bt", "dora_scales"):
            addresses[f"{name}.{attribute}"] = getattr(layer, attribute).data_ptr()
        for i, view in enumerate((*layer.lora_a_stacked, *layer.lora_b_stacked)):
            addresses[f"{name}.stacked{i}"] = view.untyped_storage().data_ptr()
    return addresses


def test_read_tensors_keep_their_storage_across_batches_and_swaps(vllm_context):
    block, _ = filled_block(seed=4, max_tokens=16)
    before = read_tensors(block)
    assert before["qkv_proj.stacked0"] == before["qkv_proj.slot_a"]
    generator = torch.Generator().manual_seed(9)
    for batch in ALL_BATCHES.values():
        select_batch(block.wrapper, batch)
    for layer in block.layers.values():  # swap: new adapters into both slots
        a, b, s = random_slot_weights(layer, RANK, generator)
        load_slot(layer, DORA_SLOT, a, b, None)
        load_slot(layer, LORA_SLOT, a, b, s)
    select_batch(block.wrapper, ALL_BATCHES["mixed"])
    assert read_tensors(block) == before


def test_traced_scale_step_follows_each_new_batch(block):
    """The scale step of the non-CPU path (before vLLM's GPU LoRA kernels): traced on one
    batch, it must gather each later batch's rows from the persistent plan."""
    block, weights = block
    layer = block.layers["gate_up_proj"]
    scales = torch.cat(weights["gate_up_proj"][4])

    def scale(output: torch.Tensor) -> torch.Tensor:
        _scale_base_output(layer, output, plan_of(layer))
        return output

    torch._dynamo.reset()
    step = compile_without_guards(scale)
    for batch in ("one dora slot", "base only", "mixed", "lora only"):
        slots = ALL_BATCHES[batch]
        select_batch(block.wrapper, slots)
        output = torch.randn(len(slots), scales.shape[0])
        want = torch.stack([row * scales if slot == DORA_SLOT else row
                            for row, slot in zip(output, slots, strict=True)])
        torch._dynamo.mark_dynamic(output, 0)
        torch.testing.assert_close(step(output), want, msg=batch)
