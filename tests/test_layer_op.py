"""The plugin's layer op in vLLM's real LoRA layers, token by token against the formula
    y_t = s_t * (W0 x_t) + B_t (A_t x_t) + b
(s_t = 1 and no B, A for base-model tokens, s_t = 1 for LoRA tokens), on every path the
forward can take: no DoRA token (vLLM's own path), one DoRA slot for the whole batch (a
broadcast multiply), and mixed batches (per-token rows), base tokens included."""

from __future__ import annotations

import pytest
import torch

import adapters.vllm_plugin as plugin
from adapters.vllm_plugin.layers import plan_of
from tests.vllm_layers import (
    DORA_SLOT,
    LORA_SLOT,
    BlockShapes,
    load_slot,
    lora_block,
    random_slot_weights,
    select_batch,
)

SHAPES = BlockShapes(hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16)
RANK = 4  # below the slots' max rank, 8: vLLM pads, as for a real adapter
MAX_RANK = 8
BATCHES = {
    "base only": [None, None],
    "lora only": [LORA_SLOT, LORA_SLOT, LORA_SLOT],
    "one dora slot": [DORA_SLOT, DORA_SLOT, DORA_SLOT],
    "mixed": [None, LORA_SLOT, DORA_SLOT, DORA_SLOT, LORA_SLOT, None],
}


def load_twins(layer, generator: torch.Generator):
    """A LoRA adapter in one slot and a DoRA adapter with the same A and B in the other (B
    scaled so the LoRA term is well above float32 rounding); returns A, B and s."""
    a, b, s = random_slot_weights(layer, RANK, generator)
    b = [10 * b_i for b_i in b]
    load_slot(layer, LORA_SLOT, a, b, None)
    load_slot(layer, DORA_SLOT, a, b, s)
    return a, b, s


def filled_block(seed: int, max_tokens: int):
    """The layers with both slots loaded, and per layer the weights the formula needs."""
    plugin.register()
    generator = torch.Generator().manual_seed(seed)
    block = lora_block(SHAPES, MAX_RANK, max_tokens=max_tokens, generator=generator, bias=True)
    weights = {name: (*block.base_weights[name], *load_twins(layer, generator))
               for name, layer in block.layers.items()}
    return block, weights


@pytest.fixture(scope="module")
def block(vllm_context):
    return filled_block(seed=0, max_tokens=8)


def expected(x: torch.Tensor, slots, w0, bias, a, b, s) -> torch.Tensor:
    rows = []
    for x_t, slot in zip(x, slots, strict=True):
        y_t = w0 @ x_t
        if slot is not None:
            lora = torch.cat([b_i @ (a_i @ x_t) for a_i, b_i in zip(a, b, strict=True)])
            scale = torch.cat(s) if slot == DORA_SLOT else torch.ones_like(y_t)
            y_t = scale * y_t + lora
        rows.append(y_t + bias)
    return torch.stack(rows)


@pytest.mark.parametrize("batch", BATCHES)
def test_layer_outputs_follow_the_formula_per_token(block, batch):
    block, weights = block
    slots = BATCHES[batch]
    select_batch(block.wrapper, slots)
    for name, layer in block.layers.items():
        x = torch.randn(len(slots), layer.input_size, generator=torch.Generator().manual_seed(1))
        output, _ = layer(x)
        torch.testing.assert_close(output, expected(x, slots, *weights[name]),
                                   rtol=1e-5, atol=1e-6, msg=f"{name}, {batch}")


LONG_PREFILL = ([None] * 100 + [DORA_SLOT] * 150 + [LORA_SLOT] * 60 + [None] * 10
                + [DORA_SLOT] * 40 + [LORA_SLOT] * 40)


@pytest.mark.parametrize("slots", [LONG_PREFILL, LONG_PREFILL[::-1]], ids=["long", "reversed"])
def test_long_prefill_batches_with_split_runs_follow_the_formula(vllm_context, slots):
    """Prompts of several sequences in one batch, each slot in two separate runs (the
    gathered path) and base-model tokens around them."""
    plugin.register()
    generator = torch.Generator().manual_seed(5)
    block = lora_block(SHAPES, MAX_RANK, max_tokens=len(slots), generator=generator, bias=True)
    select_batch(block.wrapper, slots, is_prefill=True)
    for name, layer in block.layers.items():  # loaded after the batch was mapped
        weights = (*block.base_weights[name], *load_twins(layer, generator))
        x = torch.randn(len(slots), layer.input_size, generator=generator)
        torch.testing.assert_close(layer(x)[0], expected(x, slots, *weights),
                                   rtol=1e-5, atol=1e-5, msg=name)


def test_the_dora_slot_differs_from_its_lora_twin(block):
    """The scale really is applied: the same A and B without it give other outputs."""
    block, _ = block
    outputs = {}
    for slot in (LORA_SLOT, DORA_SLOT):
        select_batch(block.wrapper, [slot])
        x = torch.randn(1, SHAPES.hidden, generator=torch.Generator().manual_seed(2))
        outputs[slot] = block.layers["qkv_proj"](x)[0]
    assert (outputs[LORA_SLOT] - outputs[DORA_SLOT]).abs().max() > 1e-3


def test_each_slot_reads_its_rank_only_and_its_b_t_in_one_block(block):
    """The eager path's per-slot views cover the adapter's rank, not the padded slot, and
    each B^T is contiguous (the expand reads it cold every step; strided it cost more)."""
    block, _ = block
    for name, layer in block.layers.items():
        rows = RANK * len(layer.lora_a_stacked)
        for slot in (LORA_SLOT, DORA_SLOT):
            a_t, b_t = layer.dora_slot_weights.a_t[slot], layer.dora_slot_weights.b_t[slot]
            assert a_t.shape == (layer.input_size, rows), name
            assert b_t.shape == (rows, sum(layer.output_slices)), name
            assert b_t.is_contiguous(), name


@pytest.mark.parametrize("batch", ["base only", "lora only", "mixed"])
def test_the_op_times_each_adapter_group_it_runs(block, batch):
    """The engine's cost account: every slot with tokens gets work time, DoRA time only for
    a DoRA slot and less than its whole group's, and nothing for a slot not in the batch."""
    block, _ = block
    slots = BATCHES[batch]
    select_batch(block.wrapper, slots)
    work = plan_of(block.layers["qkv_proj"]).work
    work.clear()
    for layer in block.layers.values():
        layer(torch.randn(len(slots), layer.input_size))
    for slot in (LORA_SLOT, DORA_SLOT):
        if slot in slots:
            assert work.seconds[slot] > 0, slot
        else:
            assert work.seconds[slot] == 0, slot
    assert work.dora_seconds[LORA_SLOT] == 0
    if DORA_SLOT in slots:
        assert 0 < work.dora_seconds[DORA_SLOT] < work.seconds[DORA_SLOT]
    assert sum(work.seconds) == sum(work.seconds[slot] for slot in set(slots) - {None})


def test_turning_the_group_order_leaves_every_output_bit_for_bit(block):
    """The engine turns the order of a batch's groups each step (to share out the first
    group's cache misses): groups write disjoint rows, so nothing else may change."""
    block, _ = block
    slots = BATCHES["mixed"]
    select_batch(block.wrapper, slots)
    plan = plan_of(block.layers["qkv_proj"])
    firsts = set()
    for name, layer in block.layers.items():
        x = torch.randn(len(slots), layer.input_size, generator=torch.Generator().manual_seed(3))
        outputs = []
        for step in range(3):
            plan.rotate_groups(step)
            firsts.add(plan.groups[0].slot)
            outputs.append(layer(x)[0])
        assert all(torch.equal(outputs[0], output) for output in outputs[1:]), name
    assert firsts == {LORA_SLOT, DORA_SLOT}
