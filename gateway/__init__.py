"""dora-gateway's HTTP side: an OpenAI-compatible, multi-tenant gateway in front of vLLM.

A request enters through `api/` (routes and request parsing), is authenticated and limited by
`tenancy/`, names an adapter of the `registry`, is sent to a vLLM backend by `upstream/`
(choice, adapter loading, proxy) and is measured by `telemetry/`. `engine/` runs and restarts
the local vLLM and knows what the engines accept; `bench/` is the load generator. `serve`
assembles it all (`app` builds the ASGI app) and `cli` is the command line.
"""
