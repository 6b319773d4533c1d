"""Slot bookkeeping for DoRA scales in vLLM's LoRA model manager.

When an adapter takes a slot, each layer's scale row is filled from the adapter's
`dora_scales` (sub-module scales gathered for packed layers such as qkv_proj); vLLM's own
`reset_lora`/`set_lora` calls have already reset the row to ones.
"""

from __future__ import annotations

import torch
from vllm.lora.model_manager import LoRAModelManager

from adapters.vllm_plugin.layers import set_scale


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


def patch_manager() -> None:
    original_activate = LoRAModelManager.activate_adapter

    def activate_adapter(self, lora_id: int) -> bool:
        activated = original_activate(self, lora_id)
        if activated:
            fill_slot(self, lora_id)
        return activated

    LoRAModelManager.activate_adapter = activate_adapter
