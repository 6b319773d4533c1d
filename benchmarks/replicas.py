"""Benchmark: many adapters over two vLLM replicas, adapter affinity against round robin.

    python -m benchmarks.replicas [--adapters 32] [--zipf 1.0] [--requests 160]
                                  [--streams 8] [--tokens 32] [--slots 4] [--cpu-cache 16]
                                  [--rounds 2] [--load-factor 1.25]

Two vLLM replicas of the default model (eager, `--max-loras SLOTS`, `--max-cpu-loras N`),
each pinned to its own core, behind a real gateway (`dora-gateway serve`) with ADAPTERS
adapters (the demo adapters under ADAPTERS names, each its own adapter to vLLM). The same
request list runs through a gateway with `[routing] policy = "adapter-affinity"` (and
`load_factor = LOAD_FACTOR`) and one with `"round-robin"`, in alternating order for
`--rounds`: `--requests` streamed requests, `--streams` at a time, each naming adapter k with
probability proportional to 1/k^zipf (seeded). Before each run every adapter is unloaded from
both replicas, so each run starts cold. Reported per policy: the adapter loads (adapter,
replica pairs the gateway loaded), TTFT p50/p95, TPOT p50 and throughput (generated tokens
over the run's wall time).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from adapters import paths
from benchmarks.many_adapters import Figures, Run, adapter_names, timed_traffic
from gateway.engine.process import EngineSettings
from gateway.upstream.routing import AFFINITY, DEFAULT_LOAD_FACTOR, ROUND_ROBIN
from tests.engine import unload_adapter
from tests.gateway_process import ADMIN_KEY, GLOBEX_KEY, GatewayProcess, write_config
from tests.replicas import PinnedEngine, running_replicas

LOGS = Path("bench-results")


@dataclass
class PolicyRun(Run):
    """A run under one routing policy (`kind`), with the adapter loads it made."""

    loads: int = 0


def adapters_dir(count: int, root: Path) -> Path:
    """`many_adapters.adapter_names(count)`, each a copy of its demo adapter under `root`."""
    for name, source in adapter_names(count).items():
        shutil.copytree(source, root / name)
    return root


def zipf_traffic(names: list[str], requests: int, exponent: float, seed: int = 0) -> list[str]:
    weights = [1 / (rank + 1) ** exponent for rank in range(len(names))]
    return random.Random(seed).choices(names, weights, k=requests)


def unload_all(engines: list[PinnedEngine]) -> None:
    for engine in engines:
        models = httpx.get(engine.base_url + "/v1/models", timeout=30).json()["data"]
        for model in models:
            if "--" in model["id"]:
                unload_adapter(engine.base_url, model["id"]).raise_for_status()


async def traffic(url: str, models: list[str], streams: int, tokens: int) -> tuple[float, list]:
    return await timed_traffic(url, GLOBEX_KEY, models, streams, tokens)


def run_policy(policy: str, engines: list[PinnedEngine], adapters: Path, models: list[str],
               args: argparse.Namespace, work: Path) -> PolicyRun:
    unload_all(engines)
    config = write_config(work / f"{policy}.toml", model=paths.default_model_dir(),
                          adapters_dir=adapters, roots=[],
                          backends=[engine.base_url for engine in engines],
                          registry_url=f"sqlite:///{work / (policy + '.sqlite3')}",
                          max_loras=args.slots)
    config.write_text(config.read_text() + f'\n[routing]\npolicy = "{policy}"\n'
                      f"load_factor = {args.load_factor}\n")
    (work / f"{policy}.sqlite3").unlink(missing_ok=True)
    gateway = GatewayProcess.start(config, LOGS / f"replicas-gateway-{policy}.log")
    try:
        wall_s, measurements = asyncio.run(traffic(gateway.url, models, args.streams,
                                                   args.tokens))
        with gateway.client(ADMIN_KEY) as client:
            listed = client.get("/admin/adapters").json()["data"]
    finally:
        gateway.stop()
    loads = sum(len(adapter["loaded_backends"]) for adapter in listed)
    return PolicyRun(policy, wall_s, measurements, loads)


def summary(runs: list[PolicyRun]) -> str:
    f = Figures.of(runs)
    loads = "/".join(str(run.loads) for run in runs)
    return (f"| {runs[0].kind} | {f.answered} | {f.failed} | {loads} | {f.tokens_per_s:.1f} | "
            f"{f.ttft_p50:.0f} | {f.ttft_p95:.0f} | {f.tpot_p50:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=4, help="each replica's --max-loras")
    parser.add_argument("--cpu-cache", type=int, default=16,
                        help="each replica's --max-cpu-loras")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--load-factor", type=float, default=DEFAULT_LOAD_FACTOR,
                        help="[routing] load_factor of the gateways")
    args = parser.parse_args()
    LOGS.mkdir(exist_ok=True)
    settings = EngineSettings(model=paths.default_model_dir(), max_loras=args.slots,
                              max_cpu_loras=args.cpu_cache, max_lora_rank=16)
    with tempfile.TemporaryDirectory() as scratch, \
            running_replicas(settings, LOGS, "replicas-vllm") as engines:
        work = Path(scratch)
        adapters = adapters_dir(args.adapters, work / "adapters")
        names = sorted(path.name for path in adapters.iterdir())
        models = zipf_traffic(random.Random(1).sample(names, len(names)), args.requests,
                              args.zipf)
        runs: dict[str, list[PolicyRun]] = {AFFINITY: [], ROUND_ROBIN: []}
        for round_ in range(args.rounds):
            order = list(runs) if round_ % 2 == 0 else list(runs)[::-1]
            for policy in order:
                runs[policy].append(run_policy(policy, engines, adapters, models, args, work))
    print(f"{args.adapters} adapters, Zipf {args.zipf}, {args.requests} requests, "
          f"{args.streams} streams, {args.tokens} tokens; each replica: {args.slots} slots, "
          f"CPU cache {args.cpu_cache}; {args.rounds} rounds; load factor {args.load_factor}")
    print("| policy | requests | failed | adapter loads (per run) | tokens/s | TTFT p50 ms | "
          "TTFT p95 ms | TPOT p50 ms |\n|---|---|---|---|---|---|---|---|")
    for policy_runs in runs.values():
        print(summary(policy_runs))


if __name__ == "__main__":
    main()
