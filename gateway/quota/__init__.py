"""Per-tenant request and token limits: the counters, the policy, and the guard in front of vLLM."""
