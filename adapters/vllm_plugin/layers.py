"""DoRA's per-token output scale inside vLLM's linear LoRA layers.

Each patched layer holds a table `dora_scales [max_loras + 1, out_local]`: row 0 is all ones
(the base model, and the rows of layers an adapter leaves alone), row i + 1 the scale `s` of
the adapter in slot i (ones for plain LoRA). The batch plan (`batch_plan`) gives each token
its row, so no branch is needed for base-model tokens.

Semantics, per token t with slot i_t (-1 for base-model tokens):
    y_t = dora_scales[i_t + 1] * (W0 x_t) + B~_{i_t} (A_{i_t} x_t) + b
Where vLLM would use its CPU punica wrapper, the scale and the LoRA term are one grouped
pass (`cpu_lora`). Elsewhere (GPUs: `PunicaWrapperGPU`) vLLM's own LoRA kernels add the LoRA
term, after one gather-multiply by the plan's rows; eagerly,
that step is skipped when no DoRA token is in the batch and is a broadcast multiply when all
tokens share one slot. Traced code (vLLM's compiled mode, CUDA graphs) always runs the
gather, over persistent tensors only.
"""

from __future__ import annotations

import torch
from vllm import envs
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.layers.column_parallel_linear import (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
)
from vllm.lora.layers.row_parallel_linear import RowParallelLinearWithLoRA
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.platforms import current_platform
from vllm.utils.import_utils import resolve_obj_by_qualname

from adapters.vllm_plugin.batch_plan import BatchPlan
from adapters.vllm_plugin.cpu_lora import apply_lora, join_lora_weights, register_op, use_rank
from adapters.vllm_plugin.scale_step import scale_rows

CPU_PUNICA_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
PLAN_ATTRIBUTE = "dora_plan"  # on the punica wrapper that all of a model's layers share
# Exactly these classes: their subclasses (fully sharded LoRA, variable slices) split the
# LoRA math differently, and DoRA on them is refused rather than guessed.
DORA_LAYER_TYPES = (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
def dora_unsupported_reason(layer: BaseLinearLayerWithLoRA) -> str | None:
    """Why this layer cannot apply a DoRA scale exactly, or None if it can."""
    if type(layer) not in DORA_LAYER_TYPES:
        return f"{type(layer).__name__} layers (DoRA supports plain column/row-parallel LoRA)"
    if envs.VLLM_LORA_ENABLE_DUAL_STREAM:
        return "the dual-stream LoRA path (VLLM_LORA_ENABLE_DUAL_STREAM)"
    if (isinstance(layer, MergedColumnParallelLinearWithLoRA)
            and type(layer.base_layer) is not MergedColumnParallelLinear
            and type(layer.base_layer) is not QKVParallelLinear):
        return f"{type(layer.base_layer).__name__} base layers (custom forward)"
    if layer.lora_config.fully_sharded_loras:
        return "fully sharded LoRA (--fully-sharded-loras)"
    if not isinstance(layer.base_layer.quant_method, UnquantizedLinearMethod):
        return f"quantized base layers ({type(layer.base_layer.quant_method).__name__})"
    return None


def allocate_scales(layer: BaseLinearLayerWithLoRA, max_loras: int) -> None:
    out_local = sum(layer.output_slices)
    layer.dora_scales = torch.ones(max_loras + 1, out_local, dtype=layer.lora_config.lora_dtype,
                                   device=layer.device)
    layer.dora_slot_rows = layer.dora_scales.unbind(0)  # views: the table is only set in place


def reset_scale(layer: BaseLinearLayerWithLoRA, index: int) -> None:
    layer.dora_scales[index + 1] = 1
    plan_of(layer).mark_dora(index, False)


def set_scale(layer: BaseLinearLayerWithLoRA, index: int,
              scales: list[torch.Tensor | None]) -> None:
    """Fill slot `index` from per-sub-module scales (q, k, v or gate, up, or one), sharded
    for tensor parallelism by the layer's own `slice_lora_b` (s is a [out, 1] "B")."""
    reason = dora_unsupported_reason(layer)
    if reason is not None:
        raise ValueError(f"DoRA is not supported on {reason}")
    if len(scales) != layer.n_slices:
        raise ValueError(f"DoRA scales for {len(scales)} sub-modules, layer has {layer.n_slices}")
    columns = [None if s is None else s.reshape(-1, 1) for s in scales]
    if layer.tp_size > 1:
        columns = layer.slice_lora_b(columns if layer.n_slices > 1 else columns[0])
        columns = columns if isinstance(columns, list) else [columns]
    row = torch.cat([torch.ones(size, 1) if c is None else c.float()
                     for c, size in zip(columns, layer.output_slices, strict=True)])
    layer.dora_scales[index + 1].copy_(row[:, 0])
    plan_of(layer).mark_dora(index, True)


def plan_of(layer: BaseLinearLayerWithLoRA) -> BatchPlan:
    """The batch plan of the layer's punica wrapper, made the first time a layer asks."""
    wrapper = layer.punica_wrapper
    if not hasattr(wrapper, PLAN_ATTRIBUTE):
        setattr(wrapper, PLAN_ATTRIBUTE, BatchPlan(wrapper._token_lora_indices.shape[0],
                                                   layer.lora_a_stacked[0].shape[0],
                                                   wrapper.device))
    return getattr(wrapper, PLAN_ATTRIBUTE)


def uses_cpu_lora(layer: BaseLinearLayerWithLoRA) -> bool:
    """Whether the layer runs the grouped CPU LoRA path, which stands in for the ops of
    vLLM's CPU punica wrapper: so wherever the platform uses that wrapper (the others keep
    their own kernels, after the scale step)."""
    return (current_platform.get_punica_wrapper() == CPU_PUNICA_WRAPPER
            and dora_unsupported_reason(layer) is None)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """[tokens, features] view (the transformers backend adds a batch dimension)."""
    return tensor.flatten(0, -2) if tensor.ndim == 3 else tensor


def _scale_base_output(layer: BaseLinearLayerWithLoRA, output: torch.Tensor,
                       plan: BatchPlan) -> None:
    """Semantics: output[t, :] *= dora_scales[rows[t], :]   (in place)

    Eagerly, a batch whose tokens all use one slot is one broadcast multiply by a row view
    made once (indexing the table per layer and step costs as much as the multiply)."""
    if plan.single_slot is not None and not torch.compiler.is_compiling():
        output.mul_(layer.dora_slot_rows[plan.single_slot + 1])
    else:
        scale_rows(output, layer.dora_scales, plan.rows)


def _cpu_forward(layer: BaseLinearLayerWithLoRA, x: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    output = layer._get_quant_method().apply(layer.base_layer, x, None)
    apply_lora(layer, _flat(output), _flat(x), plan_of(layer))
    return output if bias is None else output.add_(bias)


def _scaled_forward(layer: BaseLinearLayerWithLoRA, x: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """Base output, scale, bias, then vLLM's own LoRA add (non-CPU platforms)."""
    output = layer._get_quant_method().apply(layer.base_layer, x, None)
    _scale_base_output(layer, _flat(output), plan_of(layer))
    if bias is not None:
        output.add_(bias)
    return layer._apply_lora_to_output(x, output)


def patch_layers() -> None:
    """Give every linear LoRA layer a scale table and the scaled forward; on the CPU, the
    grouped LoRA path with fused weights."""
    original_apply_sync = BaseLinearLayerWithLoRA._apply_sync
    original_reset = BaseLinearLayerWithLoRA.reset_lora
    original_set_mapping = BaseLinearLayerWithLoRA.set_mapping

    def _apply_sync(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.dora_cpu_lora:
            return _cpu_forward(self, x, bias)
        if torch.compiler.is_compiling() or plan_of(self).has_dora:
            return _scaled_forward(self, x, bias)
        return original_apply_sync(self, x, bias)

    def reset_lora(self, index: int) -> None:
        original_reset(self, index)
        reset_scale(self, index)
        if self.dora_cpu_lora:
            use_rank(self, index, 0)

    def set_mapping(self, punica_wrapper: PunicaWrapperBase) -> None:
        original_set_mapping(self, punica_wrapper)
        plan_of(self)

    BaseLinearLayerWithLoRA._apply_sync = _apply_sync
    BaseLinearLayerWithLoRA.reset_lora = reset_lora
    BaseLinearLayerWithLoRA.set_mapping = set_mapping
    for cls in (BaseLinearLayerWithLoRA, MergedColumnParallelLinearWithLoRA,
                MergedQKVParallelLinearWithLoRA):
        _wrap_create_lora_weights(cls)
        _wrap_set_lora(cls)
    patch_update_metadata(resolve_obj_by_qualname(current_platform.get_punica_wrapper()))
    register_op()


def _wrap_create_lora_weights(cls: type) -> None:
    if "create_lora_weights" not in vars(cls):
        return
    original = cls.create_lora_weights

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        original(self, max_loras, lora_config, model_config)
        allocate_scales(self, max_loras)
        self.dora_cpu_lora = uses_cpu_lora(self)
        if self.dora_cpu_lora:
            join_lora_weights(self)

    cls.create_lora_weights = create_lora_weights


def _wrap_set_lora(cls: type) -> None:
    if "set_lora" not in vars(cls):
        return
    original = cls.set_lora

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        original(self, index, lora_a, lora_b)
        if self.dora_cpu_lora:
            parts = lora_a if isinstance(lora_a, list) else [lora_a]
            use_rank(self, index, max((a.shape[0] for a in parts if a is not None), default=0))

    cls.set_lora = set_lora


def mapped_slots(index_mapping: tuple[int, ...], lora_index_to_id: list[int | None],
                 ) -> set[int]:
    """The slots a batch's tokens use (-1: the base model), from vLLM's per-token lora ids
    (0: none) on the host."""
    return {lora_index_to_id.index(i) if i > 0 else -1 for i in set(index_mapping)}


def patch_update_metadata(wrapper_cls: type[PunicaWrapperBase]) -> None:
    """Write the batch plan whenever a `wrapper_cls` maps a new batch (the platform's punica
    wrapper; tests also run vLLM's GPU wrapper on the CPU). Once per class."""
    if getattr(wrapper_cls, "writes_dora_plan", False):
        return
    original = wrapper_cls.update_metadata

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size,
                        **kwargs) -> None:
        original(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        plan = getattr(self, PLAN_ATTRIBUTE, None)
        if plan is not None:
            plan.write(self.token_lora_indices,
                       mapped_slots(mapping.index_mapping, lora_index_to_id),
                       with_groups=isinstance(self, PunicaWrapperCPU))

    wrapper_cls.update_metadata = update_metadata
    wrapper_cls.writes_dora_plan = True
