"""What the gateway relies on in vLLM's HTTP API, besides the two completion routes.

Every backend, the local engine or an external vLLM, must serve the base model under
`SERVED_BASE_MODEL` (`--served-model-name`), run with `--enable-lora` and allow runtime LoRA
loading (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`).
"""

from __future__ import annotations

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
LOAD_ADAPTER_PATH = "/v1/load_lora_adapter"
UNLOAD_ADAPTER_PATH = "/v1/unload_lora_adapter"
# The model name requests for the base model carry upstream (clients say `names.BASE_MODEL`).
SERVED_BASE_MODEL = "base"
# vLLM's gauges of the requests it holds: generating, and queued for a place in the batch.
QUEUE_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def requests_held(metrics_text: str) -> int:
    """Requests running or waiting in a vLLM, from its Prometheus text (summed over engines)."""
    total = 0.0
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in QUEUE_GAUGES:
            total += float(line.rsplit(" ", 1)[1])
    return round(total)
