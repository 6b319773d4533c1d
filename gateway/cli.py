"""The `dora-gateway` command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path

from adapters import paths
from adapters.base_checkpoint import BaseCheckpoint
from adapters.default_model import prepare_default_model
from adapters.errors import DoraGatewayError
from adapters.merge import merge_adapter
from adapters.store import CompiledStore
from gateway.bench.command import add_bench_command
from gateway.config import GatewayConfig, is_backend_url, load_config
from gateway.serve import serve


def _prepare_model(args: argparse.Namespace) -> None:
    print(prepare_default_model(args.out or paths.default_model_dir()))


def _compile(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    store = CompiledStore(args.out or paths.compiled_store_dir())
    entry = store.compile(args.adapter, BaseCheckpoint(args.base))
    outcome = "cache hit" if entry.cache_hit else "compiled"
    print(f"{outcome} in {time.perf_counter() - started:.2f}s", file=sys.stderr)
    print(entry.path)


def _merge(args: argparse.Namespace) -> None:
    print(merge_adapter(args.adapter, args.base, args.out))


def with_overrides(config: GatewayConfig, port: int | None,
                   backends: list[str] | None) -> GatewayConfig:
    """`serve --port` and `--backend URL ...` win over the config file."""
    if port is not None:
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, port=port))
    if backends:
        bad = [url for url in backends if not is_backend_url(url)]
        if bad:
            raise DoraGatewayError(f"--backend takes http(s) URLs or dns+http(s)://NAME:PORT "
                                   f"names, got {', '.join(bad)}")
        engine = dataclasses.replace(config.engine, backends=tuple(backends))
        config = dataclasses.replace(config, engine=engine)
    return config


def _serve(args: argparse.Namespace) -> None:
    config = with_overrides(load_config(args.config), args.port, args.backend)
    _log_to_stderr()
    # SIGTERM must unwind like Ctrl-C, so the vLLM server `serve` started is stopped with it
    # (uvicorn shuts down gracefully on it, then raises it again).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        serve(config)


def _log_to_stderr() -> None:
    """The gateway's own events (backend down, vLLM restarted) beside uvicorn's log lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    gateway_log = logging.getLogger("gateway")
    gateway_log.addHandler(handler)
    gateway_log.setLevel(logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dora-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare-model", help="fetch and convert the default model")
    prepare.add_argument("--out", type=Path, help=f"default: {paths.default_model_dir()}")
    prepare.set_defaults(run=_prepare_model)

    compile_ = commands.add_parser("compile", help="precompute an adapter's s and B~")
    compile_.add_argument("adapter", type=Path, help="PEFT adapter directory")
    compile_.add_argument("--base", type=Path, required=True, help="base model directory")
    compile_.add_argument("--out", type=Path, help=f"store; default: {paths.compiled_store_dir()}")
    compile_.set_defaults(run=_compile)

    merge = commands.add_parser("merge", help="write base + adapter as one model directory")
    merge.add_argument("adapter", type=Path, help="PEFT adapter directory")
    merge.add_argument("--base", type=Path, required=True, help="base model directory")
    merge.add_argument("--out", type=Path, required=True, help="new model directory")
    merge.set_defaults(run=_merge)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible gateway")
    serve.add_argument("--config", type=Path, required=True, help="gateway TOML file")
    serve.add_argument("--port", type=int, help="listen here instead of [server] port")
    serve.add_argument("--backend", action="append", metavar="URL",
                       help="an already running vLLM server, or dns+http://NAME:PORT for "
                            "every address NAME resolves to (repeatable); replaces "
                            "[engine] backends, and no local vLLM is started")
    serve.set_defaults(run=_serve)
    add_bench_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DoraGatewayError as exc:
        print(f"dora-gateway {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
