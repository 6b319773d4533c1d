"""`dora-gateway serve`: build the gateway from its config file and run it with uvicorn.

Everything is checked before the port opens: the config, the base model, and every adapter
in the adapters directory (validated and compiled), so a bad deployment fails at start with
the reason, not on a user's first request. With no `[engine] backends`, one vLLM server is
started on loopback for the gateway's lifetime (not yet restarted if it dies).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import uvicorn

from adapters import paths
from adapters.base_checkpoint import BaseCheckpoint
from adapters.store import CompiledStore
from gateway.app import create_app
from gateway.backend import BackendPool
from gateway.config import GatewayConfig
from gateway.registry import AdapterRegistry
from gateway.vllm_process import EngineSettings, VllmServer


def serve(config: GatewayConfig) -> None:
    if config.engine.backends:
        asyncio.run(_serve(config, config.engine.backends))
        return
    with local_engine(config) as server:
        asyncio.run(_serve(config, [server.base_url]))


def local_engine(config: GatewayConfig) -> VllmServer:
    engine = config.engine
    settings = EngineSettings(model=config.model_path, dtype=engine.dtype,
                              max_loras=engine.max_loras, max_lora_rank=engine.max_lora_rank,
                              extra_args=list(engine.extra_args))
    return VllmServer(settings, log_path=paths.home() / "logs" / "vllm-gateway.log")


async def _serve(config: GatewayConfig, backend_urls: Sequence[str]) -> None:
    pool = BackendPool(backend_urls)
    try:
        registry = AdapterRegistry(BaseCheckpoint(config.model_path),
                                   CompiledStore(paths.compiled_store_dir()),
                                   config.adapters.roots, pool)
        await registry.add_directory(config.adapters.dir)
        app = create_app(config, registry, pool)
        server = uvicorn.Server(uvicorn.Config(app, host=config.server.host,
                                               port=config.server.port))
        await server.serve()
    finally:
        await pool.aclose()
