"""Benchmark: what the gateway hop adds, gateway vs direct-to-vLLM on the same engine.

    python -m benchmarks.gateway_overhead [--rounds 3] [--requests 4] [--tokens 32] [--pin]

One vLLM engine (CPU, float32, the default model, the demo `pirate` DoRA adapter loaded
under its own name) and one `dora-gateway serve` in front of it (which loads `pirate` again
under its internal name). Each round sends the same streamed requests (`dora-gateway
bench`'s load: greedy, `ignore_eos`, the same prompts both ways) straight to vLLM and through
the gateway, alternating which goes first, at 1 and at 8 concurrent streams. Also printed:
the time the gateway itself spends per request outside the upstream call, from its own
`/metrics` (request duration minus upstream duration).

`--pin` runs vLLM's worker threads alone on CPU 0 and everything else on CPU 1 (see
`benchmarks/pinning.py`), so the hop is measured without their interference (as on a serving
host, where the gateway has cores of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from adapters import paths
from benchmarks.pinning import pin_worker_apart
from gateway.bench.load import BenchSettings, Measurement, make_client, run_bench
from gateway.engine.process import EngineProcess, EngineSettings
from gateway.telemetry.latency import percentile
from tests.gateway_process import GLOBEX_KEY, GatewayProcess, write_config

MODELS = ("base", "pirate")
STREAMS = (1, 8)
PATHS = ("direct", "gateway")


@dataclass(frozen=True)
class Target:
    path: str
    url: str
    key: str | None


async def measure(target: Target, streams: int, requests: int, tokens: int,
                  warmup: bool) -> list[Measurement]:
    settings = BenchSettings(url=target.url, models=MODELS, concurrency=streams,
                             requests=requests, max_tokens=tokens, rounds=1, warmup=warmup)
    async with make_client(target.url, target.key, streams) as client:
        return await run_bench(settings, client)


async def run_rounds(targets: list[Target], rounds: int, requests: int,
                     tokens: int) -> dict[tuple[int, str, str], list[Measurement]]:
    """Samples by (streams, path, model); the path that goes first alternates by round."""
    samples: dict[tuple[int, str, str], list[Measurement]] = {}
    for round_index in range(rounds):
        order = targets if round_index % 2 == 0 else targets[::-1]
        for streams in STREAMS:
            for target in order:
                count = requests if streams == 1 else streams  # one full batch
                runs = await measure(target, streams, count, tokens, warmup=round_index == 0)
                for run in runs:
                    if run.error:
                        raise RuntimeError(f"{target.path} {run.model}: {run.error}")
                    samples.setdefault((streams, target.path, run.model), []).append(run)
    return samples


def ms(value: float | None) -> str:
    return "-" if value is None else f"{1e3 * value:.1f} ms"


def print_table(samples: dict[tuple[int, str, str], list[Measurement]]) -> None:
    print("| streams | path | model | n | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 |")
    print("|---|---|---|---|---|---|---|---|")
    for (streams, path, model), runs in sorted(samples.items()):
        ttfts = [run.ttft_s for run in runs]
        tpots = [run.tpot_s for run in runs]
        print(f"| {streams} | {path} | {model} | {len(runs)} | {ms(percentile(ttfts, 50))} | "
              f"{ms(percentile(ttfts, 95))} | {ms(percentile(tpots, 50))} | "
              f"{ms(percentile(tpots, 95))} |")
    print()
    for streams in STREAMS:
        for model in MODELS:
            direct, via = samples[(streams, "direct", model)], samples[(streams, "gateway", model)]
            ttft = (percentile([r.ttft_s for r in via], 50)
                    - percentile([r.ttft_s for r in direct], 50))
            tpot = (percentile([r.tpot_s for r in via], 50)
                    / percentile([r.tpot_s for r in direct], 50))
            print(f"{streams} stream(s), {model}: gateway - direct TTFT p50 {1e3 * ttft:+.1f} ms,"
                  f" gateway / direct TPOT p50 {tpot:.4f}")


def gateway_own_time(gateway_url: str) -> str:
    """Mean seconds per request spent in the gateway outside the upstream call."""
    text = httpx.get(gateway_url + "/metrics", timeout=30).text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    count = sums["dora_gateway_request_duration_seconds_count"]
    own = (sums["dora_gateway_request_duration_seconds_sum"]
           - sums["dora_gateway_upstream_duration_seconds_sum"]) / count
    return f"gateway's own time per request (e2e - upstream, mean of {count:.0f}): {ms(own)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4, help="per model and round, 1 stream")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--pin", action="store_true",
                        help="vLLM's worker threads on CPU 0, everything else on CPU 1")
    args = parser.parse_args()
    demo = paths.demo_adapters_dir()
    extra_env = pin_worker_apart() if args.pin else {}
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        settings = EngineSettings(model=paths.default_model_dir(), max_loras=4,
                                  lora_modules={"pirate": demo / "pirate"}, extra_env=extra_env)
        with EngineProcess(settings, log_path=work_dir / "vllm.log") as engine:
            config = write_config(work_dir / "gateway.toml", model=paths.default_model_dir(),
                                  adapters_dir=demo, roots=[], backends=[engine.base_url])
            gateway = GatewayProcess.start(config, work_dir / "gateway.log")
            try:
                targets = [Target("direct", engine.base_url, None),
                           Target("gateway", gateway.url, GLOBEX_KEY)]
                samples = asyncio.run(run_rounds(targets, args.rounds, args.requests,
                                                 args.tokens))
                print_table(samples)
                print(gateway_own_time(gateway.url))
            finally:
                gateway.stop()


if __name__ == "__main__":
    main()
