"""What the gateway measures: the per-request meter and records, the latency definitions shared
with `bench`, Prometheus metrics, the dashboard's window and its page."""
