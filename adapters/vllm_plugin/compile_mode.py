"""vLLM's compiled mode with LoRA on the CPU.

vLLM 0.32's CPU platform traces the model once with Dynamo (then inductor) by default, but
turns compilation off whenever LoRA is enabled: its CPU LoRA ops read host-side batch state
that a graph traced once would freeze. The plugin's CPU LoRA path reads only persistent
tensors through an opaque op (`cpu_lora`), so with `DORA_GATEWAY_CPU_COMPILE=1` the plugin
keeps the compile mode the platform chose for the model with LoRA on too (the gateway sets
it for the engine it starts, `[engine] compile`). `--enforce-eager` (mode NONE) is honoured
either way.
"""

from __future__ import annotations

import os

from vllm.config import CompilationMode, VllmConfig
from vllm.platforms.cpu import CpuPlatform

from adapters.plugin_env import CPU_COMPILE


def compile_with_lora() -> bool:
    return os.environ.get(CPU_COMPILE, "0") == "1"


def patch_cpu_compile_mode() -> None:
    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        requested = vllm_config.compilation_config.mode
        original(cls, vllm_config)
        if vllm_config.lora_config is None or not compile_with_lora():
            return
        if requested == CompilationMode.VLLM_COMPILE:  # the platform's rewrite of it
            vllm_config.compilation_config.mode = CompilationMode.DYNAMO_TRACE_ONCE
        else:
            vllm_config.compilation_config.mode = requested

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
