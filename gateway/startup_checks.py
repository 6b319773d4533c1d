"""What `serve` checks before it starts anything, each failure naming its fix.

A missing or wrong base model would otherwise surface as a vLLM traceback a minute later
(vLLM takes a missing directory for a model hub id), a taken port as uvicorn's bind error
after vLLM has started, and an unreachable object store at the first admin call; all are
cheap to check first.
"""

from __future__ import annotations

import errno
import socket

from adapters import paths
from adapters.base_checkpoint import BaseCheckpoint
from adapters.errors import BaseModelError, DoraGatewayError, SourceError
from adapters.store import CompiledStore
from adapters.tree_cache import TreeCache
from gateway.config import GatewayConfig
from gateway.registry.artifacts import ArtifactStore, LocalArtifacts, S3Artifacts


class StartupError(DoraGatewayError):
    """The deployment cannot start; the message says what to do."""


def checked_base_model(config: GatewayConfig) -> BaseCheckpoint:
    """The base model of `config`, or a `StartupError` that says how to provide it."""
    path = config.model_path
    if path == paths.default_model_dir() and not (path / "config.json").is_file():
        raise StartupError(f"the default model is not prepared (nothing usable at {path}): run "
                           f"`dora-gateway prepare-model` once (`make serve` does it too), or "
                           f"set [model] path in {config.source}")
    if not path.is_dir():
        raise StartupError(f"[model] path {path} is not a directory: set it in {config.source} "
                           f"to a model directory, or remove it to use the default model")
    if not (path / "config.json").is_file():
        raise StartupError(f"[model] path {path} has no config.json: it must be a Hugging Face "
                           f"model directory (config.json and safetensors weights, as "
                           f"save_pretrained writes it)")
    try:
        return BaseCheckpoint(path)
    except BaseModelError as exc:
        raise StartupError(f"{exc}: save the model with safe_serialization=True") from exc


def check_port_free(host: str, port: int) -> None:
    """Bind the listen address once, as uvicorn will, to report a taken port up front."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"port {port} on {host} is already in use (another gateway "
                                   f"or server listens there): stop it, or choose another port "
                                   f"with --port or [server] port") from exc
            raise StartupError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): check "
                               f"[server] host and port") from exc


def checked_artifact_store(config: GatewayConfig) -> ArtifactStore:
    """The store `[store]` names; an S3 store is asked once now, so wrong credentials or an
    unreachable endpoint fail the start with the reason rather than the first admin call."""
    compiled = CompiledStore(paths.compiled_store_dir())
    if not config.store.url:
        return LocalArtifacts(compiled, paths.uploads_dir())
    store = S3Artifacts(config.store.url, compiled,
                        TreeCache(config.store.cache_dir, config.store.cache_max_bytes))
    try:
        store.check()
    except SourceError as exc:
        raise StartupError(f"[store] url {config.store.url}: {exc.detail} (the endpoint and "
                           f"credentials come from the AWS environment: AWS_ENDPOINT_URL_S3, "
                           f"AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION)") from exc
    return store
