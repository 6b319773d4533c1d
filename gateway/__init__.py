"""The HTTP side of dora-gateway: the CLI now, the OpenAI-compatible service later."""
