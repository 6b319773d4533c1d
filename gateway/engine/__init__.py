"""vLLM as the gateway runs it: what the engines accept (limits, admission of adapters), and the
local vLLM process with its supervisor."""
