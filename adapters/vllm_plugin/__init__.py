"""The vLLM plugin that serves DoRA adapters exactly (entry point `vllm.general_plugins`).

vLLM loads general plugins in every process (API server, engine core, workers). `register`
patches, once per process, vLLM's LoRA loading (`loading`), slot management (`manager`) and
linear LoRA layers (`layers`, with the grouped CPU LoRA path of `cpu_lora` and the batch
plan of `batch_plan`); it also fixes the stock CPU LoRA ops for base-model tokens
(`cpu_punica_fix`), skips the vocabulary-sized LoRA step no adapter uses (`vocab_lora`),
makes runtime unloading free the slot (`unload`), lets vLLM load the model it compiled
before instead of compiling it again (`compile_cache`) and, on request, lets the CPU engine
compile with LoRA on (`compile_mode`); on the CPU path it also times each adapter's work per
engine step for vLLM's `/metrics` (`engine_metrics`). It patches only the vLLM release it
was written against: on any other, it patches nothing and says so, and DoRA adapters stay
refused by vLLM itself (fail closed).
"""

from __future__ import annotations

import logging

SUPPORTED_VLLM = "0.32.0"
# Under "vllm" to share its log handler. Nothing of vLLM is imported here, so that the
# plugin's vLLM-free modules (`batch_plan`, `scale_step`) run where vLLM is not installed.
logger = logging.getLogger("vllm.dora_gateway")
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
    from adapters.vllm_plugin.compile_cache import patch_compile_cache_load
    from adapters.vllm_plugin.compile_mode import patch_cpu_compile_mode
    from adapters.vllm_plugin.cpu_punica_fix import patch_cpu_punica
    from adapters.vllm_plugin.engine_metrics import patch_step_clock
    from adapters.vllm_plugin.layers import patch_layers
    from adapters.vllm_plugin.loading import patch_loading
    from adapters.vllm_plugin.manager import patch_manager
    from adapters.vllm_plugin.unload import patch_unload
    from adapters.vllm_plugin.vocab_lora import patch_vocab_lora

    patch_compile_cache_load()
    patch_cpu_compile_mode()
    patch_cpu_punica()
    patch_layers()
    patch_loading()
    patch_manager()
    patch_unload()
    patch_vocab_lora()
    patch_step_clock()
    _patched = True
    logger.info("dora-gateway DoRA plugin active")
