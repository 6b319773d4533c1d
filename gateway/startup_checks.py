"""What `serve` checks before it starts anything, each failure naming its fix.

A missing or wrong base model would otherwise surface as a vLLM traceback a minute later
(vLLM takes a missing directory for a model hub id), and a taken port as uvicorn's bind
error after vLLM has started; both are cheap to check first.
"""

from __future__ import annotations

import errno
import socket

from adapters import paths
from adapters.base_checkpoint import BaseCheckpoint
from adapters.errors import BaseModelError, DoraGatewayError
from gateway.config import GatewayConfig


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
