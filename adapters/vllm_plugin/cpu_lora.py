"""The CPU LoRA path: tokens grouped by adapter, every slice of a layer in two matmuls.

vLLM 0.32's CPU LoRA ops gather a copy of each token's adapter weights (`[tokens, out, r]`)
and run a batched einsum per slice, per layer and step; that made an adapter cost 1.7x the
base model per token here. This path instead runs, per adapter present in the batch, one
shrink and one expand over all of a layer's slices at once:

- each layer's A slices live stacked in one `slot_a [max_loras, r * slices, in]` and its B
  slices, transposed, block-diagonally in one `slot_bt [max_loras, r * slices, out]`;
  vLLM's own `lora_a_stacked` / `lora_b_stacked` become views into them, so its `set_lora`
  and `reset_lora` fill them unchanged (the off-diagonal blocks stay zero). Rank j of slice
  i is row j * slices + i, so an adapter of rank r < max_lora_rank uses the first
  r * slices rows only: the matmuls skip vLLM's zero padding, and each slot's B^T is one
  contiguous block (the expand reads it cold, once per layer and step; read strided, it
  cost a layer up to 28% more);
- the DoRA scale is applied in the same pass, to the base output of the group's tokens;
- base-model tokens form no group and get nothing.

The op reads only tensors that live as long as the engine (the weights, the scale table and
the batch plan), and is registered as a custom op: vLLM's compiled mode traces through it as
one opaque call, as it does vLLM's GPU LoRA kernels, and it reads the batch plan at run time.
"""

from __future__ import annotations

import weakref
from time import perf_counter
from typing import NamedTuple

import torch
from torch.library import Library
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.utils.torch_utils import direct_register_custom_op

from adapters.vllm_plugin.batch_plan import BatchPlan, plan_by_order

_LIBRARY = Library("dora_gateway", "FRAGMENT")  # must live as long as the op
# slot_a's address -> its layer, for the custom op, which is given tensors only
_JOINED_LAYERS: weakref.WeakValueDictionary[int, BaseLinearLayerWithLoRA] = \
    weakref.WeakValueDictionary()


def join_lora_weights(layer: BaseLinearLayerWithLoRA) -> None:
    """Re-home vLLM's per-slice LoRA weights of `layer` as views of two joined tensors."""
    a_slices, b_slices = layer.lora_a_stacked, layer.lora_b_stacked
    max_loras, _, rank, in_size = a_slices[0].shape
    slices = len(a_slices)
    out_sizes = [b.shape[2] for b in b_slices]
    like = {"dtype": a_slices[0].dtype, "device": a_slices[0].device}
    layer.slot_a = torch.zeros(max_loras, rank * slices, in_size, **like)
    layer.slot_bt = torch.zeros(max_loras, rank * slices, sum(out_sizes), **like)
    offsets = [sum(out_sizes[:i]) for i in range(slices)]
    layer.lora_a_stacked = tuple(layer.slot_a[:, None, i::slices] for i in range(slices))
    layer.lora_b_stacked = tuple(
        layer.slot_bt[:, None, i::slices, offset:offset + size].transpose(2, 3)
        for i, (offset, size) in enumerate(zip(offsets, out_sizes, strict=True)))
    layer.dora_slot_weights = SlotWeights.of(layer.slot_a, layer.slot_bt, layer.dora_scales)
    _JOINED_LAYERS[layer.slot_a.data_ptr()] = layer


class SlotWeights(NamedTuple):
    """Per-slot views of a layer's joined weights, made once per adapter (indexing and
    transposing per layer and step would cost as much as the small matmuls themselves)."""

    a_t: list[torch.Tensor]  # [in, R_slot] per slot
    b_t: list[torch.Tensor]  # [R_slot, out] per slot, contiguous
    scale: list[torch.Tensor]  # [out] per slot (the scale table without row 0)

    @classmethod
    def of(cls, slot_a: torch.Tensor, slot_bt: torch.Tensor, scales: torch.Tensor,
           ) -> SlotWeights:
        return cls(list(slot_a.transpose(1, 2).unbind(0)), list(slot_bt.unbind(0)),
                   list(scales.unbind(0)[1:]))


def use_rank(layer: BaseLinearLayerWithLoRA, slot: int, rank: int) -> None:
    """Make the eager path's views of `slot` cover the `rank` its adapter really has (the
    rest of the slot is vLLM's zero padding up to max_lora_rank)."""
    used = rank * len(layer.lora_a_stacked)
    layer.dora_slot_weights.a_t[slot] = layer.slot_a[slot, :used].t()
    layer.dora_slot_weights.b_t[slot] = layer.slot_bt[slot, :used]


def add_lora(output: torch.Tensor, x: torch.Tensor, slot_a: torch.Tensor,
             slot_bt: torch.Tensor, scales: torch.Tensor, order: torch.Tensor) -> None:
    """Semantics, for every token t whose slot i_t >= 0 (in place):
        output[t] = scales[i_t + 1] * output[t] + slot_bt[i_t].T @ (slot_a[i_t] @ x[t])
    where the scale applies to DoRA slots only (`scales` row 0 is the base model's ones).

    Shapes: output [tokens, out] (the base layer's output, without bias), x [tokens, in],
    slot_a [max_loras, R, in], slot_bt [max_loras, R, out], scales [max_loras + 1, out];
    `order` is a `BatchPlan`'s. Rows past the plan's tokens (padding) are left as they are.
    The tensors name their layer and plan: the layer's per-slot views of its weights (cut to
    each adapter's rank) and the plan's current groups are used, not rebuilt per call;
    `scales` is the layer's own table.
    """
    weights = _JOINED_LAYERS[slot_a.data_ptr()].dora_slot_weights
    add_groups(output, x, plan_by_order(order), weights)


def add_groups(output: torch.Tensor, x: torch.Tensor, plan: BatchPlan,
               weights: SlotWeights) -> None:
    """`add_lora` over the plan's groups and the layer's slot views; each group's time
    goes to the plan's `work` (the engine's account of what each adapter costs). One clock
    read per group and two more around a DoRA multiply: about 0.2 us a group, whose
    matmuls take 10-20 us."""
    order, seconds, dora_seconds = plan.order, plan.work.seconds, plan.work.dora_seconds
    last = perf_counter()
    for group in plan.groups:
        count = group.end - group.start
        if count == output.shape[0]:  # the whole batch (slicing costs as much as a multiply)
            y, x_group = output, x
        elif group.first >= 0:  # contiguous tokens: views, nothing copied
            y, x_group = output.narrow(0, group.first, count), x.narrow(0, group.first, count)
        else:
            positions = order[group.start:group.end]
            y, x_group = output.index_select(0, positions), x.index_select(0, positions)
        if group.is_dora:
            scaling = perf_counter()
            y.mul_(weights.scale[group.slot])
            dora_seconds[group.slot] += perf_counter() - scaling
        y.addmm_(torch.mm(x_group, weights.a_t[group.slot]), weights.b_t[group.slot])
        if group.first < 0:
            output.index_copy_(0, positions, y)
        now = perf_counter()
        seconds[group.slot] += now - last
        last = now


def _add_lora_fake(output: torch.Tensor, x: torch.Tensor, slot_a: torch.Tensor,
                   slot_bt: torch.Tensor, scales: torch.Tensor, order: torch.Tensor) -> None:
    return None


def register_op() -> None:
    """`torch.ops.dora_gateway.add_lora`, for traced graphs."""
    direct_register_custom_op("add_lora", add_lora, mutates_args=["output"],
                              fake_impl=_add_lora_fake, target_lib=_LIBRARY,
                              dispatch_key="CPU")


def apply_lora(layer: BaseLinearLayerWithLoRA, output: torch.Tensor, x: torch.Tensor,
               plan: BatchPlan) -> None:
    """`add_lora` for one layer: while Dynamo traces, as the custom op (the graph holds one
    opaque call that reads the plan at run time); eagerly, without the dispatcher."""
    if torch.compiler.is_compiling():
        torch.ops.dora_gateway.add_lora(output, x, layer.slot_a, layer.slot_bt,
                                        layer.dora_scales, plan.order)
    else:
        add_groups(output, x, plan, layer.dora_slot_weights)
