"""Slot bookkeeping for DoRA scales in vLLM's LoRA model manager.

When an adapter takes a slot, each layer's scale row is filled from the adapter's
`dora_scales` (sub-module scales gathered for packed layers such as qkv_proj); vLLM's own
`reset_lora`/`set_lora` calls have already reset the row to ones. When the batch mapping
changes, a host-side flag records whether any token of the batch uses a DoRA adapter, and
the table rows are computed once for all layers (one slot number when all tokens share it).
"""

from __future__ import annotations

import torch
from vllm.lora.model_manager import LoRAModelManager

from adapters.vllm_plugin.layers import mark_batch, set_scale


def _layer_scales(manager: LoRAModelManager, lora_model, module_name: str,
                  ) -> list[torch.Tensor | None]:
    scales = getattr(lora_model, "dora_scales", {})
    sub_modules = manager.packed_modules.get(module_name, [module_name])
    return [scales.get(name) for name in sub_modules]


def fill_slot(manager: LoRAModelManager, lora_id: int) -> None:
    """Write the DoRA scales of adapter `lora_id` into its slot of every layer."""
    lora_model = manager._registered_adapters[lora_id]
    if not getattr(lora_model, "dora_scales", None):
        return
    index = manager.lora_index_to_id.index(lora_id)
    for module_name, layer in manager.modules.items():
        scales = _layer_scales(manager, lora_model, module_name)
        if any(s is not None for s in scales):
            set_scale(layer, index, scales)


def batch_has_dora(manager: LoRAModelManager, ids: set[int]) -> bool:
    """Whether any of the batch's lora ids (0 means none) is a DoRA adapter."""
    return any(getattr(manager._registered_adapters.get(i), "dora_scales", None)
               for i in ids - {0})


def single_slot(manager: LoRAModelManager, ids: set[int]) -> int | None:
    """The slot every token of the batch uses, or None when tokens differ (or none has an
    adapter; lora id 0 means none)."""
    if len(ids) != 1 or 0 in ids:
        return None
    return manager.lora_index_to_id.index(next(iter(ids)))


def patch_manager() -> None:
    original_activate = LoRAModelManager.activate_adapter
    original_set_mapping = LoRAModelManager._set_adapter_mapping

    def activate_adapter(self, lora_id: int) -> bool:
        activated = original_activate(self, lora_id)
        if activated:
            fill_slot(self, lora_id)
        return activated

    def _set_adapter_mapping(self, mapping) -> None:
        original_set_mapping(self, mapping)
        ids = set(mapping.index_mapping)
        active = batch_has_dora(self, ids)
        slot = single_slot(self, ids) if active else None
        for wrapper in self.punica_wrapper_mapping.values():
            mark_batch(wrapper, active, slot, self.lora_slots + 1)

    LoRAModelManager.activate_adapter = activate_adapter
    LoRAModelManager._set_adapter_mapping = _set_adapter_mapping
