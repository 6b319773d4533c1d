"""The vLLM plugin that serves DoRA adapters exactly (entry point `vllm.general_plugins`).

vLLM loads general plugins in every process (API server, engine core, workers). `register`
patches vLLM's LoRA loading, slot management and linear LoRA layers (and fixes the CPU LoRA
ops for base-model tokens, see `cpu_punica_fix`, and makes runtime unloading free the slot,
see `unload`), once per process, and
only on the vLLM release it was written against: on any other, it patches nothing and says
so, and DoRA adapters stay refused by vLLM itself (fail closed).
"""

from __future__ import annotations

from vllm.logger import init_logger

SUPPORTED_VLLM = "0.32.0"
logger = init_logger("vllm.dora_gateway")  # under "vllm" to share its log handler
_patched = False


def installed_vllm_version() -> str:
    import vllm

    return vllm.__version__


def register() -> None:
    global _patched
    if _patched:
        return
    version = installed_vllm_version()
    if version != SUPPORTED_VLLM:
        logger.error("dora-gateway's DoRA plugin supports vLLM %s only, found %s: not patching;"
                     " DoRA adapters will be refused.", SUPPORTED_VLLM, version)
        return
    from adapters.vllm_plugin.cpu_punica_fix import patch_cpu_punica
    from adapters.vllm_plugin.layers import patch_layers
    from adapters.vllm_plugin.loading import patch_loading
    from adapters.vllm_plugin.manager import patch_manager
    from adapters.vllm_plugin.unload import patch_unload

    patch_cpu_punica()
    patch_layers()
    patch_loading()
    patch_manager()
    patch_unload()
    _patched = True
    logger.info("dora-gateway DoRA plugin active")
