"""Environment variables the vLLM plugin reads, in a module free of vLLM imports, so the
gateway can set them for the engines it starts."""

CPU_COMPILE = "DORA_GATEWAY_CPU_COMPILE"  # "1": vLLM's compiled mode with LoRA on the CPU
# prometheus_client's multiprocess mode: vLLM's /metrics then also carries the counters its
# worker processes write (the plugin's engine cost figures); one fresh directory per engine.
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# How the plugin's answer to a load begins when the adapter could not be fetched from the
# store: the gateway tells this passing fault from a refusal of the adapter itself.
FETCH_FAILED = "cannot fetch the adapter from the store"
