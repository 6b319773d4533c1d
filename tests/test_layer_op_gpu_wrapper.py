"""The path GPU users get, in vLLM's real LoRA layers on the CPU, against PEFT.

On a GPU the plugin scales the base output by the plan's rows and leaves the LoRA term to
vLLM's own `PunicaWrapperGPU`. Here that wrapper runs for real on CPU tensors, with only its
Triton kernels replaced by references of their documented semantics (`tests/gpu_punica.py`),
so the glue is what is tested: the batch plan written by that wrapper's `update_metadata`,
its kernel metadata, the slot indices and `add_lora_linear`'s arguments. Each sub-module's
expected output comes from a PEFT layer (`use_dora`) with the same W0, A, B and magnitude.

vLLM's compiled mode traces once and a CUDA graph replays what it captured, so the block is
also traced once per capture size and replayed on other batches (padding mapped to no
adapter), the traced code must hold no host sync and no data-dependent shape, and every
tensor it reads must keep its storage across batches, adapter swaps and unloads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, get_peft_model
from vllm.config.lora import LoRAConfig
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.utils import get_captured_lora_counts

import adapters.vllm_plugin as plugin
from adapters.dora import dora_scale, fused_lora_b
from adapters.vllm_plugin.layers import plan_of, set_scale
from tests.gpu_punica import gpu_platform, gpu_punica_kernels, gpu_wrapper
from tests.test_layer_op_compiled import compile_without_guards
from tests.vllm_layers import BlockShapes, LoRABlock, lora_block, select_batch

SHAPES = BlockShapes(hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16)
MAX_RANK = 8
MAX_TOKENS = 16
# slot -> (DoRA?, rank): ranks below the slots' max are padded by vLLM, as for real adapters
ADAPTERS = {0: (False, 4), 1: (True, 8), 2: (True, 2)}
MAX_LORAS = len(ADAPTERS)
DECODE = [None, 0, 1, 2, 1, None, 0, 2]
BATCHES = {
    "decode, all adapters and base": DECODE,
    "prefill, one sequence each": [None] * 3 + [1] * 5 + [0] * 4 + [2] * 3 + [None],
    "base only": [None] * 4,
    "one dora adapter": [1] * 5,
    "one lora adapter": [0] * 3,
    "two adapters": [2, 0, 2, 0],
}
# vLLM's CUDA-graph capture sizes up to this block's token budget
CAPTURE_SIZES = [size for size in [1, 2, 4, *range(8, 256, 8)] if size <= MAX_TOKENS]


@dataclass
class SubModule:
    """One PEFT layer (`use_dora` or not) on its slice of a vLLM layer's base weight."""

    peft_layer: torch.nn.Module
    a: torch.Tensor  # [r, in]
    fused_b: torch.Tensor  # [out_i, r], B~ = g * s * B
    scale: torch.Tensor | None  # s [out_i], DoRA only


def peft_sub_module(w0: torch.Tensor, bias: torch.Tensor | None, dora: bool, rank: int,
                    generator: torch.Generator) -> SubModule:
    """A PEFT layer with random A, B (and magnitude near ||W0||: s is not 1), and the
    compiled form the plugin serves."""
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=bias is not None)
    with torch.no_grad():
        holder.proj.weight.copy_(w0)
        if bias is not None:
            holder.proj.bias.copy_(bias)
    model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=2 * rank, use_dora=dora,
                                              target_modules=["proj"]))
    layer = model.base_model.model.proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(torch.randn(a.shape, generator=generator) / w0.shape[1] ** 0.5)
        b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
        if dora:
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(1 + 0.1 * torch.randn(magnitude.shape, generator=generator))
    layer.eval()
    scaling = layer.scaling["default"]
    scale = (dora_scale(w0, a, b, layer.lora_magnitude_vector["default"].weight, scaling)
             if dora else None)
    return SubModule(layer, a.detach().clone(), fused_lora_b(b.detach(), scaling, scale), scale)


def base_slices(block: LoRABlock, name: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each sub-module's rows of the layer's base weight and bias (q, k, v; gate, up)."""
    w0, bias = block.base_weights[name]
    sizes = list(block.layers[name].output_slices)
    return [(w, None if bias is None else b) for w, b in zip(
        w0.split(sizes), [None] * len(sizes) if bias is None else bias.split(sizes),
        strict=True)]


def load_adapter(block: LoRABlock, slot: int, dora: bool, rank: int,
                 generator: torch.Generator) -> dict[str, list[SubModule]]:
    """A fresh adapter in `slot` of every layer, as vLLM's manager and the plugin load it."""
    adapter = {}
    for name, layer in block.layers.items():
        parts = [peft_sub_module(w, b, dora, rank, generator) for w, b in base_slices(block, name)]
        layer.reset_lora(slot)
        a, b = [p.a for p in parts], [p.fused_b for p in parts]
        layer.set_lora(slot, a if layer.n_slices > 1 else a[0], b if layer.n_slices > 1 else b[0])
        if dora:
            set_scale(layer, slot, [p.scale for p in parts])
        adapter[name] = parts
    return adapter


def expected(block: LoRABlock, name: str, x: torch.Tensor, slots: list[int | None],
             adapters: dict[int, dict[str, list[SubModule]]]) -> torch.Tensor:
    """PEFT's output per token: the base layer for base tokens, the adapter's PEFT layers
    (one per sub-module, concatenated) for the others."""
    w0, bias = block.base_weights[name]
    rows = []
    with torch.no_grad():
        for x_t, slot in zip(x, slots, strict=True):
            if slot is None:
                rows.append(w0 @ x_t + (0 if bias is None else bias))
            else:
                rows.append(torch.cat([part.peft_layer(x_t[None])[0]
                                       for part in adapters[slot][name]]))
    return torch.stack(rows)


@dataclass
class GpuBlock:
    block: LoRABlock
    adapters: dict[int, dict[str, list[SubModule]]]
    generator: torch.Generator


def make_gpu_block(specialize_active_lora: bool, seed: int) -> GpuBlock:
    """The block on vLLM's GPU wrapper, every slot loaded (inside `gpu_punica_kernels`)."""
    plugin.register()
    generator = torch.Generator().manual_seed(seed)
    config = LoRAConfig(max_lora_rank=MAX_RANK, max_loras=MAX_LORAS, lora_dtype=torch.float32,
                        specialize_active_lora=specialize_active_lora)
    with gpu_platform():
        block = lora_block(SHAPES, MAX_RANK, MAX_TOKENS, generator, bias=True, config=config,
                           wrapper=gpu_wrapper(MAX_TOKENS, config))
    assert not any(layer.dora_cpu_lora for layer in block.layers.values())
    adapters = {slot: load_adapter(block, slot, dora, rank, generator)
                for slot, (dora, rank) in ADAPTERS.items()}
    return GpuBlock(block, adapters, generator)


@pytest.fixture(scope="module", params=[False, True], ids=["padded-lora-count",
                                                           "specialized-lora-count"])
def gpu_block(vllm_context, request):
    """`specialize_active_lora`: whether the kernels' grid is the active adapters, rounded
    up to a captured count, or always max_loras + 1."""
    with gpu_punica_kernels():
        yield make_gpu_block(request.param, seed=0)


def forward_of(block: LoRABlock) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    layers = list(block.layers.values())

    def forward(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():  # as vLLM runs the model
            return [layer(x)[0] for layer, x in zip(layers, inputs, strict=True)]
    return forward


def check(gpu: GpuBlock, forward, slots: list[int | None], label: str,
          is_prefill: bool = False) -> None:
    block = gpu.block
    select_batch(block.wrapper, slots, is_prefill=is_prefill, max_loras=MAX_LORAS)
    inputs = [torch.randn(len(slots), layer.input_size, generator=gpu.generator)
              for layer in block.layers.values()]
    for (name, _), x, output in zip(block.layers.items(), inputs, forward(inputs), strict=True):
        torch.testing.assert_close(output, expected(block, name, x, slots, gpu.adapters),
                                   rtol=1e-5, atol=1e-5, msg=f"{name}, {label}")


@pytest.mark.parametrize("batch", BATCHES)
def test_every_layer_matches_peft_eagerly(gpu_block, batch):
    check(gpu_block, forward_of(gpu_block.block), BATCHES[batch], batch,
          is_prefill=batch.startswith("prefill"))


def test_a_slot_reused_after_an_unload_serves_its_new_adapter(vllm_context):
    """Slot 1 unloaded (its tokens then get nothing: vLLM maps no adapter there), then a
    DoRA adapter of another rank loaded into it."""
    with gpu_punica_kernels():
        gpu = make_gpu_block(specialize_active_lora=False, seed=1)
        forward = forward_of(gpu.block)
        for layer in gpu.block.layers.values():
            layer.reset_lora(1)
        check(gpu, forward, [0, 2, None, 2], "slot 1 unloaded")
        gpu.adapters[1] = load_adapter(gpu.block, 1, True, 4, gpu.generator)
        check(gpu, forward, DECODE, "slot 1 reloaded")


@pytest.mark.parametrize("size", CAPTURE_SIZES)
def test_traced_once_per_capture_size_replays_every_batch(gpu_block, size):
    """As a CUDA graph captured at `size` tokens: traced on one batch, then run on others
    of every active-adapter count vLLM captures, real tokens first and the rest padding
    mapped to no adapter."""
    torch._dynamo.reset()
    forward = compile_without_guards(forward_of(gpu_block.block))
    counts = get_captured_lora_counts(MAX_LORAS, specialize=True)
    for count in counts:
        used = list(range(min(count, MAX_LORAS)))  # count includes "no adapter"
        real = [used[i % len(used)] for i in range(size - size // 4)]
        check(gpu_block, forward, real + [None] * (size - len(real)),
              f"{size} tokens, {len(used)} adapters")


class GraphRecorder:
    """A Dynamo backend that keeps the FX graphs it is given (and runs them as they are)."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs) -> Callable:
        self.graphs.append(graph)
        return graph.forward


HOST_SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "nonzero", "unique"}
DATA_DEPENDENT = {torch.nonzero, torch.unique, torch.masked_select, torch.unique_consecutive,
                  torch.argwhere}


def test_the_traced_path_has_no_host_sync_and_no_data_dependent_shape(gpu_block):
    """One graph (a host sync or a branch on a tensor's value would break it, which
    `fullgraph` refuses), and none of the calls that read a value back to the host or give
    a shape that depends on values. The reference kernels are opaque ops, as vLLM's are."""
    recorder = GraphRecorder()
    torch._dynamo.reset()
    forward = torch.compile(forward_of(gpu_block.block), fullgraph=True, dynamic=False,
                            backend=recorder)
    check(gpu_block, forward, DECODE, "traced")
    [graph] = recorder.graphs
    calls = [(node.op, node.target) for node in graph.graph.nodes]
    assert not [target for op, target in calls
                if op == "call_method" and target in HOST_SYNC_METHODS]
    assert not [target for op, target in calls
                if op == "call_function" and target in DATA_DEPENDENT]
    assert any("dora_gateway_tests" in str(target) for _, target in calls)  # the kernels


def read_tensors(block: LoRABlock) -> dict[str, int]:
    """Storage address of every tensor the traced path reads."""
    wrapper = block.wrapper
    meta = wrapper.token_mapping_meta
    addresses = {f"meta.{name}": getattr(meta, name).data_ptr() for name in (
        "token_lora_mapping", "token_indices_sorted_by_lora_ids", "active_lora_ids",
        "num_tokens_per_lora", "lora_token_start_loc", "no_lora_flag_cpu",
        "num_active_loras_cpu")}
    layer: BaseLinearLayerWithLoRA
    for name, layer in block.layers.items():
        plan = plan_of(layer)
        addresses[f"{name}.plan.rows"] = plan.rows.data_ptr()
        addresses[f"{name}.dora_scales"] = layer.dora_scales.data_ptr()
        for i, weights in enumerate((*layer.lora_a_stacked, *layer.lora_b_stacked)):
            addresses[f"{name}.stacked{i}"] = weights.data_ptr()
    return addresses


def test_read_tensors_keep_their_storage_across_batches_swaps_and_unloads(gpu_block):
    block = gpu_block.block
    select_batch(block.wrapper, DECODE, max_loras=MAX_LORAS)
    before = read_tensors(block)
    for slots in BATCHES.values():
        select_batch(block.wrapper, slots, max_loras=MAX_LORAS)
    for layer in block.layers.values():
        layer.reset_lora(2)
    gpu_block.adapters[2] = load_adapter(block, 2, False, 8, gpu_block.generator)
    gpu_block.adapters[0] = load_adapter(block, 0, True, 4, gpu_block.generator)
    select_batch(block.wrapper, DECODE, max_loras=MAX_LORAS)
    assert read_tensors(block) == before
    check(gpu_block, forward_of(block), DECODE, "after the swaps")
