"""Who is calling and what they may do: API keys, tenants, concurrency limits, access rules."""
