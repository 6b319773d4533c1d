"""`dora-gateway bench`: a load generator that measures, per model, what a streamed request
costs through an OpenAI-compatible gateway (time to first token, time per output token)."""
