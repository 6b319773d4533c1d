"""DoRA's per-token output scale inside vLLM's linear LoRA layers.

Each patched layer holds a table `dora_scales [max_loras + 1, out_local]`: row i is the scale
`s` of the adapter in slot i (ones for a plain LoRA adapter), and the last row is all ones,
so punica's token index -1 ("no adapter") picks "no scale" without a branch.

Semantics, per token t with slot index i_t (-1 for base tokens, i.e. the last row):
    y_t = dora_scales[i_t] * (W0 x_t) + b + B~_{i_t} (A_{i_t} x_t)
which is the base layer without bias, one gather-multiply, the bias, then vLLM's LoRA add.
When every token of the batch uses the same adapter (the common case at low concurrency),
the gather is replaced by one broadcast multiply with that slot's row. The scale step is
skipped (eager mode only) when no DoRA token is in the batch. Which case applies is
host-side state set with the batch's LoRA mapping, so no device sync is needed.
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
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    UnquantizedLinearMethod,
)

# Exactly these classes: their subclasses (fully sharded LoRA, variable slices) split the
# LoRA math differently, and DoRA on them is refused rather than guessed.
DORA_LAYER_TYPES = (
    ColumnParallelLinearWithLoRA,
    MergedColumnParallelLinearWithLoRA,
    QKVParallelLinearWithLoRA,
    MergedQKVParallelLinearWithLoRA,
    RowParallelLinearWithLoRA,
)
BATCH_FLAG = "dora_batch_active"
ROWS_ATTRIBUTE = "dora_table_rows"  # per-token rows (a tensor), or the one slot of all (an int)


def scale_rows_by_adapter(output: torch.Tensor, table: torch.Tensor,
                          rows: torch.Tensor) -> torch.Tensor:
    """Semantics: output[t, :] *= table[rows[t], :]   (in place)

    Shapes: output [tokens, out], table [max_loras + 1, out], rows [tokens] (slot per token,
    max_loras for "no adapter"; see `table_rows`).
    """
    if rows.shape[0] != output.shape[0]:
        rows = rows[: output.shape[0]]
    return output.mul_(table.index_select(0, rows))


def scale_by_slot(output: torch.Tensor, slot_rows: tuple[torch.Tensor, ...],
                  slot: int) -> torch.Tensor:
    """Semantics: output[t, :] *= table[slot, :] for every t   (in place)

    Shapes: output [tokens, out], slot_rows: the table's rows as views, [out] each (made once:
    indexing the table per layer and step would cost as much as the multiply itself).
    """
    return output.mul_(slot_rows[slot])


def table_rows(token_lora_indices: torch.Tensor, table_size: int) -> torch.Tensor:
    """punica's per-token slot (-1 = no adapter) as a table row: -1 becomes the ones row.

    Computed once per batch mapping, not per layer: on a small model every extra op per
    layer is a visible share of the step time.
    """
    return token_lora_indices % table_size


def mark_batch(wrapper: PunicaWrapperBase, has_dora: bool, slot: int | None,
               table_size: int) -> None:
    """Record on a punica wrapper, once per batch mapping, what every layer's forward reads:
    whether any token is DoRA, and the table rows to scale by (`slot`: the one slot all
    tokens use, or None for per-token rows)."""
    setattr(wrapper, BATCH_FLAG, has_dora)
    if has_dora:
        rows = slot if slot is not None else table_rows(wrapper.token_lora_indices, table_size)
        setattr(wrapper, ROWS_ATTRIBUTE, rows)


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
    layer.dora_scales[index] = 1


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
    layer.dora_scales[index].copy_(row[:, 0])


def _batch_has_dora(layer: BaseLinearLayerWithLoRA) -> bool:
    """Traced graphs must always hold the op; eagerly, skip it when no DoRA token is present."""
    if torch.compiler.is_compiling():
        return True
    return getattr(layer.punica_wrapper, BATCH_FLAG, False)


def _scaled_base_output(layer: BaseLinearLayerWithLoRA, x: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    output = layer._get_quant_method().apply(layer.base_layer, x, None)
    flat = output.flatten(0, -2) if output.ndim == 3 else output
    rows = getattr(layer.punica_wrapper, ROWS_ATTRIBUTE)
    if isinstance(rows, int):
        scale_by_slot(flat, layer.dora_slot_rows, rows)
    else:
        scale_rows_by_adapter(flat, layer.dora_scales, rows)
    return output if bias is None else output.add_(bias)


def patch_layers() -> None:
    """Give every linear LoRA layer a scale table and the scaled forward."""
    original_apply_sync = BaseLinearLayerWithLoRA._apply_sync
    original_reset = BaseLinearLayerWithLoRA.reset_lora

    def _apply_sync(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not _batch_has_dora(self):
            return original_apply_sync(self, x, bias)
        return self._apply_lora_to_output(x, _scaled_base_output(self, x, bias))

    def reset_lora(self, index: int) -> None:
        original_reset(self, index)
        reset_scale(self, index)

    BaseLinearLayerWithLoRA._apply_sync = _apply_sync
    BaseLinearLayerWithLoRA.reset_lora = reset_lora
    for cls in (BaseLinearLayerWithLoRA, MergedColumnParallelLinearWithLoRA,
                MergedQKVParallelLinearWithLoRA):
        _wrap_create_lora_weights(cls)


def _wrap_create_lora_weights(cls: type) -> None:
    if "create_lora_weights" not in vars(cls):
        return
    original = cls.create_lora_weights

    def create_lora_weights(self, max_loras, lora_config, model_config=None) -> None:
        original(self, max_loras, lora_config, model_config)
        allocate_scales(self, max_loras)

    cls.create_lora_weights = create_lora_weights
