"""Benchmark: many adapters through few LoRA slots.

    python -m benchmarks.many_adapters [--adapters 32] [--slots 4] [--cpu-cache N]
                                       [--streams 4] [--requests 48] [--tokens 32]
                                       [--rounds 2]

One vLLM engine (the plugin, the default model, float32) with `--max-loras SLOTS` and
`--max-cpu-loras N` (vLLM's cache of loaded adapters; its default is SLOTS), and ADAPTERS
adapters loaded at run time: the four demo adapters (three DoRA, one LoRA) under ADAPTERS
names, each its own adapter to vLLM (own id, own slot, own cache entry). Two kinds of
traffic, alternating for `--rounds`, each `--requests` streamed requests at `--streams` at a
time:
  one      every request uses the same adapter
  uniform  every request picks one of the ADAPTERS uniformly at random (seeded)
Throughput is generated tokens over the wall time of the run. Then the cold-load cost: the
runtime load call itself, and the time to first token of a request for an adapter that is not
in vLLM's cache against one right after it, when it is.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from adapters import paths
from benchmarks.pinning import pin_worker_apart
from gateway.bench.load import BenchSettings, Job, Measurement, make_client, measure
from gateway.engine.process import EngineProcess, EngineSettings
from gateway.telemetry.latency import percentile
from tests.engine import load_adapter

DEMO = ("caps", "pirate", "brief", "caps-lora")


@dataclass
class Run:
    kind: str
    wall_s: float
    measurements: list[Measurement]

    @property
    def tokens_per_s(self) -> float:
        return sum(m.completion_tokens for m in self.measurements if m.ok) / self.wall_s


def adapter_names(count: int) -> dict[str, Path]:
    """`count` names over the demo adapters' directories, in turn."""
    demo = paths.demo_adapters_dir()
    return {f"{DEMO[i % len(DEMO)]}-{i}": demo / DEMO[i % len(DEMO)] for i in range(count)}


async def timed_traffic(url: str, api_key: str | None, models: list[str], streams: int,
                        tokens: int) -> tuple[float, list[Measurement]]:
    """One request per entry of `models`, `streams` at a time: wall seconds and measurements."""
    settings = BenchSettings(url=url, models=tuple(sorted(set(models))), concurrency=streams,
                             max_tokens=tokens, warmup=False)
    slots = asyncio.Semaphore(streams)
    async with make_client(url, api_key, streams) as client:
        async def one(index: int, model: str) -> Measurement:
            async with slots:
                return await measure(client, settings, Job(model, index, 0, 0),
                                     time.perf_counter)
        started = time.perf_counter()
        results = await asyncio.gather(*(one(i, m) for i, m in enumerate(models)))
    return time.perf_counter() - started, list(results)


async def traffic(kind: str, url: str, models: list[str], streams: int, tokens: int) -> Run:
    return Run(kind, *await timed_traffic(url, None, models, streams, tokens))


@dataclass(frozen=True)
class Figures:
    """What a table row reports for runs of one kind; latencies in ms, over every run's
    answered requests; throughput is the median run's."""

    answered: int
    failed: int
    tokens_per_s: float
    ttft_p50: float
    ttft_p95: float
    tpot_p50: float
    tpot_p95: float

    @classmethod
    def of(cls, runs: list[Run]) -> Figures:
        ok = [m for run in runs for m in run.measurements if m.ok]
        ttft = [1e3 * m.ttft_s for m in ok]
        tpot = [1e3 * m.tpot_s for m in ok if m.tpot_s is not None]
        return cls(len(ok), sum(not m.ok for run in runs for m in run.measurements),
                   statistics.median(run.tokens_per_s for run in runs),
                   percentile(ttft, 50), percentile(ttft, 95),
                   percentile(tpot, 50), percentile(tpot, 95))


def summary(runs: list[Run]) -> str:
    f = Figures.of(runs)
    return (f"| {runs[0].kind} | {f.answered} | {f.failed} | {f.tokens_per_s:.1f} | "
            f"{f.ttft_p50:.0f} | {f.ttft_p95:.0f} | {f.tpot_p50:.1f} | {f.tpot_p95:.1f} |")


def cold_load(url: str, names: dict[str, Path], tokens: int) -> None:
    """A fresh name: the load call, then its first request (vLLM reads the adapter from disk
    into a slot) and a second one (already in a slot)."""
    name, path = "cold-" + next(iter(names)), next(iter(names.values()))
    started = time.perf_counter()
    response = load_adapter(url, name, path)
    response.raise_for_status()
    load_s = time.perf_counter() - started
    first, second = (asyncio.run(traffic("cold", url, [name], 1, tokens)).measurements[0]
                     for _ in range(2))
    print(f"cold load: load call {1e3 * load_s:.0f} ms; TTFT of the first request "
          f"{1e3 * first.ttft_s:.0f} ms, of the next {1e3 * second.ttft_s:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--cpu-cache", type=int, default=None,
                        help="vLLM's --max-cpu-loras (default: vLLM's, = --slots)")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pin", action="store_true", help="vLLM's worker alone on CPU 0")
    args = parser.parse_args()
    names = adapter_names(args.adapters)
    settings = EngineSettings(model=paths.default_model_dir(), max_loras=args.slots,
                              max_cpu_loras=args.cpu_cache, max_lora_rank=16,
                              extra_env=pin_worker_apart() if args.pin else {})
    log = Path("bench-results/many-adapters-vllm.log")
    with EngineProcess(settings, log_path=log) as engine:
        for name, path in names.items():
            load_adapter(engine.base_url, name, path).raise_for_status()
        chooser = random.Random(0)
        runs: dict[str, list[Run]] = {"one": [], "uniform": []}
        for _ in range(args.rounds):
            for kind in runs:
                models = ([next(iter(names))] * args.requests if kind == "one" else
                          [chooser.choice(list(names)) for _ in range(args.requests)])
                runs[kind].append(asyncio.run(traffic(kind, engine.base_url, models,
                                                      args.streams, args.tokens)))
        print(f"{args.adapters} adapters, {args.slots} slots, CPU cache "
              f"{args.cpu_cache or args.slots}, {args.streams} streams, {args.tokens} tokens")
        print("| traffic | requests | failed | tokens/s | TTFT p50 ms | TTFT p95 ms | "
              "TPOT p50 ms | TPOT p95 ms |\n|---|---|---|---|---|---|---|---|")
        for kind_runs in runs.values():
            print(summary(kind_runs))
        ratio = (statistics.median(r.tokens_per_s for r in runs["uniform"])
                 / statistics.median(r.tokens_per_s for r in runs["one"]))
        print(f"uniform / one throughput: {ratio:.3f}")
        cold_load(engine.base_url, names, args.tokens)


if __name__ == "__main__":
    main()
