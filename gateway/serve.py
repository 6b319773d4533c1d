"""`dora-gateway serve`: build the gateway from its config file and run it with uvicorn.

Everything is checked before the port opens: the config, the base model, the listen port and
the registry's database (before vLLM starts), and every adapter the adapters directory adds to
the registry (validated, admitted for the engines and compiled), so a bad deployment fails at
start with the reason and its fix, not on a user's first request. With no `[engine]
backends`, one vLLM server is started on loopback for the gateway's lifetime and restarted
whenever it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import uvicorn

from adapters import paths
from adapters.base_checkpoint import BaseCheckpoint
from adapters.tree_cache import CACHE_DIR_ENV, CACHE_MAX_BYTES_ENV
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.draining_server import DrainingServer
from gateway.engine.limits import EngineLimits
from gateway.engine.process import EngineProcess, EngineSettings
from gateway.engine.supervisor import EngineSupervisor
from gateway.registry import AdapterRegistry, RegistryDatabase
from gateway.registry.artifacts import ArtifactStore
from gateway.startup_checks import check_port_free, checked_artifact_store, checked_base_model
from gateway.upstream.pool import BackendPool
from gateway.upstream.routing import RoutingPolicy

log = logging.getLogger(__name__)
# How long an idle client connection stays open: longer than the idle timeouts of the proxies
# and load balancers usually in front (60 s for many), as nginx's 75 s is; with uvicorn's
# 5 s, a proxy that reused a connection the gateway was closing got no answer.
KEEP_ALIVE_S = 75


def serve(config: GatewayConfig) -> None:
    base = checked_base_model(config)
    check_port_free(config.server.host, config.server.port)
    artifacts = checked_artifact_store(config)
    database = RegistryDatabase.open(config.registry.url)
    try:
        if config.engine.backends:
            asyncio.run(_serve(config, base, artifacts, database, config.engine.backends))
            return
        with local_engine(config) as engine:
            log.info("started vLLM at %s (log: %s)", engine.base_url, engine.log_path)
            asyncio.run(_serve(config, base, artifacts, database, [engine.base_url],
                               local=engine))
    finally:
        database.close()


def local_engine(config: GatewayConfig) -> EngineProcess:
    """The vLLM process `[engine]` describes, on a free loopback port, fetching from the
    store into `[store] cache_dir`."""
    engine = config.engine
    settings = EngineSettings(model=config.model_path, dtype=engine.dtype,
                              max_loras=engine.max_loras, max_lora_rank=engine.max_lora_rank,
                              max_cpu_loras=engine.max_cpu_loras, compile=engine.compile,
                              extra_args=list(engine.extra_args),
                              extra_env={CACHE_DIR_ENV: str(config.store.cache_dir),
                                         CACHE_MAX_BYTES_ENV: str(config.store.cache_max_bytes)})
    return EngineProcess(settings, log_path=paths.home() / "logs" / "vllm-gateway.log")


def routing_policy(config: GatewayConfig) -> RoutingPolicy:
    """`[routing]`, with `[engine] max_loras` as the replicas' LoRA slots."""
    return RoutingPolicy(config.routing.policy, config.routing.load_factor,
                         config.engine.max_loras)


async def _serve(config: GatewayConfig, base: BaseCheckpoint, artifacts: ArtifactStore,
                 database: RegistryDatabase, backend_urls: Sequence[str],
                 local: EngineProcess | None = None) -> None:
    """Run until uvicorn stops; `local` is the local engine, which this gateway keeps
    running."""
    pool = BackendPool(backend_urls, routing=routing_policy(config))
    supervising: asyncio.Task | None = None
    try:
        registry = AdapterRegistry(base, artifacts, config.adapters.roots, pool, database,
                                   EngineLimits.from_config(config.engine))
        await registry.add_directory(config.adapters.dir)
        app = create_app(config, registry, pool)
        if local is not None:
            supervisor = EngineSupervisor(local, pool, registry, eager=config.adapters.eager)
            supervising = asyncio.create_task(supervisor.run())
        server = DrainingServer(uvicorn.Config(app, host=config.server.host,
                                               port=config.server.port,
                                               timeout_keep_alive=KEEP_ALIVE_S),
                                app.state.shutdown_gate, config.server.shutdown_grace_seconds)
        await server.serve()
    finally:
        if supervising is not None:
            supervising.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervising
        await pool.aclose()
