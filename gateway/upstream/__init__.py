"""The vLLM backends behind the gateway: the pool and its round-robin choice, health checks,
loading adapters into backends, and relaying completions to them."""
