"""What the gateway relies on in vLLM's HTTP API, besides the two completion routes.

Every backend, the local engine or an external vLLM, must serve the base model under
`SERVED_BASE_MODEL` (`--served-model-name`), run with `--enable-lora` and allow runtime LoRA
loading (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`).
"""

from __future__ import annotations

HEALTH_PATH = "/health"
LOAD_ADAPTER_PATH = "/v1/load_lora_adapter"
UNLOAD_ADAPTER_PATH = "/v1/unload_lora_adapter"
# The model name requests for the base model carry upstream (clients say `names.BASE_MODEL`).
SERVED_BASE_MODEL = "base"
