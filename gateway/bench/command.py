"""`dora-gateway bench`: the options, the progress bar, and where the results go."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
from tqdm import tqdm

from gateway.bench.chart import write_chart
from gateway.bench.load import BenchError, BenchSettings, Measurement, make_client, run_bench
from gateway.bench.report import document, error_lines, summarize, table, write_json
from gateway.names import BASE_MODEL

KEY_VARIABLES = ("DORA_GATEWAY_API_KEY", "OPENAI_API_KEY")


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench", help="measure TTFT and time per output token per model through a gateway",
        description="Stream completions through an OpenAI-compatible server (a dora-gateway, "
                    "or vLLM itself) and report p50/p95 time to first token and time per "
                    "output token per model. Requests send `ignore_eos` (a vLLM extension) "
                    "so each one generates exactly --max-tokens tokens.")
    bench.add_argument("--url", default="http://127.0.0.1:8080",
                       help="the server's base URL, with or without /v1 (default: %(default)s)")
    bench.add_argument("--api-key", metavar="KEY", help=f"default: ${KEY_VARIABLES[0]}, else "
                                         f"${KEY_VARIABLES[1]}")
    bench.add_argument("--model", action="append", metavar="NAME",
                       help="a model of the mix (repeatable; default: the base model)")
    bench.add_argument("--base-model", default=BASE_MODEL, metavar="NAME",
                       help="the model TPOT ratios are taken against (default: %(default)s)")
    bench.add_argument("--lora-twin", action="append", type=_twin, metavar="DORA=LORA",
                       help="also compare DORA's TPOT with LORA's (repeatable), e.g. "
                            "caps=caps-lora")
    bench.add_argument("--concurrency", type=_positive, default=4, metavar="N",
                       help="requests in flight at once (default: %(default)s)")
    bench.add_argument("--requests", type=_positive, default=20, metavar="N",
                       help="requests per model (default: %(default)s)")
    bench.add_argument("--prompt-tokens", type=_positive, default=32, metavar="N",
                       help="approximate prompt length: N short words (default: %(default)s)")
    bench.add_argument("--max-tokens", type=_positive, default=64, metavar="N",
                       help="tokens each request generates (default: %(default)s)")
    bench.add_argument("--mode", choices=("phases", "mixed"), default="phases",
                       help="phases: each model alone, in turn; mixed: all models interleaved "
                            "(default: %(default)s)")
    bench.add_argument("--rounds", type=_positive, default=2, metavar="N",
                       help="phases mode: cycles through the models, the order reversed "
                            "every other one; --requests is split over them "
                            "(default: %(default)s)")
    bench.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                       help="/v1/completions or /v1/chat/completions (default: %(default)s)")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), metavar="DIR",
                       help="directory for bench.json and bench.png (default: %(default)s)")
    bench.add_argument("--no-warmup", dest="warmup", action="store_false",
                       help="skip the one-token request per model sent before measuring")
    bench.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bar on stderr")
    bench.set_defaults(run=_run)


def settings_from(args: argparse.Namespace) -> BenchSettings:
    models = tuple(dict.fromkeys(args.model or [args.base_model]))
    twins = dict(args.lora_twin or [])
    missing = sorted({name for pair in twins.items() for name in pair} - set(models))
    if missing:
        raise BenchError(f"--lora-twin names models that are not in the mix: "
                         f"{', '.join(missing)} (add them with --model)")
    return BenchSettings(
        url=args.url, models=models, base_model=args.base_model, lora_twins=twins,
        concurrency=args.concurrency, requests=args.requests, prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens, mode=args.mode, rounds=args.rounds, endpoint=args.endpoint,
        warmup=args.warmup)


def _run(args: argparse.Namespace) -> None:
    settings = settings_from(args)
    api_key = args.api_key or next(
        (os.environ[name] for name in KEY_VARIABLES if os.environ.get(name)), None)
    execute(settings, make_client(settings.url, api_key, settings.concurrency), args.out,
            progress=args.progress)


def execute(settings: BenchSettings, client: httpx.AsyncClient, out: Path, *,
            progress: bool) -> None:
    """Measure, print the table, write bench.json and bench.png into `out`."""
    started_at = datetime.now(UTC)
    measurements = asyncio.run(_measure(settings, client, progress))
    rows = summarize(settings, measurements)
    print(table(rows))
    for line in error_lines(measurements):
        print(f"error: {line}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out / "bench.json", document(settings, measurements, rows,
                                                        started_at))
    if not any(m.ok for m in measurements):
        raise BenchError(f"every request failed (see {json_path}); first error: "
                         f"{measurements[0].error}")
    chart_path = write_chart(out / "bench.png", settings, rows)
    print(f"wrote {json_path} and {chart_path}", file=sys.stderr)


async def _measure(settings: BenchSettings, client: httpx.AsyncClient,
                   progress: bool) -> list[Measurement]:
    total = settings.requests * len(settings.models)
    async with client:
        with tqdm(total=total, unit="req", file=sys.stderr, disable=not progress) as bar:
            return await run_bench(settings, client, on_done=lambda _: bar.update())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _twin(text: str) -> tuple[str, str]:
    dora, _, lora = text.partition("=")
    if not dora or not lora:
        raise argparse.ArgumentTypeError(f"expected DORA=LORA, got {text!r}")
    return dora, lora
