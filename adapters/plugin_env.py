"""Environment variables the vLLM plugin reads, in a module free of vLLM imports, so the
gateway can set them for the engines it starts."""

CPU_COMPILE = "DORA_GATEWAY_CPU_COMPILE"  # "1": vLLM's compiled mode with LoRA on the CPU
