"""Runtime unloading that frees the engine's LoRA slot.

vLLM 0.32's `/v1/unload_lora_adapter` only forgets the name in the API server: the adapter
keeps its GPU slot and CPU cache entry until LRU eviction pushes it out. After a successful
unload the engine is also told to remove the adapter, so the slot is free at once. A request
still running with it is unaffected: vLLM reloads an adapter a scheduled request needs from
its path.
"""

from __future__ import annotations

from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest
from vllm.logger import init_logger

logger = init_logger("vllm.dora_gateway")


def patch_unload() -> None:
    original_unload = OpenAIServingModels.unload_lora_adapter

    async def unload_lora_adapter(self: OpenAIServingModels, request: UnloadLoRAAdapterRequest,
                                  ) -> ErrorResponse | str:
        lora = self.lora_requests.get(request.lora_name)
        result = await original_unload(self, request)
        if lora is not None and not isinstance(result, ErrorResponse):
            removed = await self.engine_client.remove_lora(lora.lora_int_id)
            logger.info("engine LoRA slot of '%s' (id %d) freed: %s", request.lora_name,
                        lora.lora_int_id, removed)
        return result

    OpenAIServingModels.unload_lora_adapter = unload_lora_adapter
