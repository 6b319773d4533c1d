"""The names of the plugin's counters on vLLM's `/metrics`, shared by the plugin that writes
them and the gateway that reads them (free of vLLM imports). Each is exported as
`dora_engine_<name>_total`; the per-adapter ones carry the label `lora_name`."""

PREFIX = "dora_engine_"
ADAPTER_LABEL = "lora_name"

STEPS = "steps"
STEP_SECONDS = "step_seconds"
STEP_TOKENS = "step_tokens"
TOKENS = "adapter_tokens"
SECONDS = "adapter_seconds"
DORA_SECONDS = "dora_seconds"
UNIFORM_SECONDS = "uniform_adapter_seconds"
UNIFORM_DORA_SECONDS = "uniform_dora_seconds"
UNIFORM_BASE_SECONDS = "uniform_base_seconds"
