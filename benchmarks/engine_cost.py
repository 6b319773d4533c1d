"""Benchmark: the engine's own added-cost figure against independent measurements.

    python -m benchmarks.engine_cost [--requests 16] [--max-tokens 48] [--compiled]

One vLLM server (the plugin, the default model, the four demo adapters, four LoRA slots) is
started as the gateway starts it, and `dora-gateway bench`'s load is sent to it directly:

  phases  each model alone with four streams (base, caps, pirate, brief, caps-lora): per
          adapter, the engine's figure over its phase against the client's A/B ratio, its
          time per output token p50 over the base model's, minus one;
  mixed   caps, pirate, brief and caps-lora interleaved, four streams: each adapter's engine
          figure in shared steps, and their mean, which `benchmarks.step_cost`'s "four"
          kind (isolated steps of those four adapters against base-only steps) measures
          from outside: four / base - 1;
  meter   what the measuring adds to a step: the op's timer statements for every LoRA layer
          and adapter group, and the closing of a step, timed alone, over the engine's mean
          step time.

The engine's figures are read from vLLM's `/metrics` before and after each part.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import timeit
from pathlib import Path
from time import perf_counter

import httpx

from adapters import paths
from adapters.engine_metric_names import (
    SECONDS,
    STEP_SECONDS,
    UNIFORM_BASE_SECONDS,
    UNIFORM_DORA_SECONDS,
    UNIFORM_SECONDS,
)
from adapters.vllm_plugin.step_meter import AdapterWork, StepTotals
from benchmarks.many_adapters import DEMO
from gateway.bench.load import BenchSettings, make_client, run_bench
from gateway.bench.report import summarize
from gateway.engine.process import EngineProcess, EngineSettings
from gateway.telemetry.engine_cost import engine_counters
from gateway.upstream.vllm_api import SERVED_BASE_MODEL

LORA_LAYERS = 30 * 4  # SmolLM2-135M: qkv, o, gate_up and down in each of 30 decoder layers
STREAMS = 4


def counters(url: str) -> dict:
    return engine_counters(httpx.get(url + "/metrics", timeout=30).text)


def engine_figures(before: dict, after: dict, models: tuple[str, ...],
                   ) -> dict[str, tuple[float, float]]:
    """Per adapter: (added cost, DoRA's part) from the counters' increase."""
    def grew(counter: str, name: str) -> float:
        return after.get((counter, name), 0.0) - before.get((counter, name), 0.0)

    return {name: (grew(UNIFORM_SECONDS, name) / grew(UNIFORM_BASE_SECONDS, name),
                   grew(UNIFORM_DORA_SECONDS, name) / grew(UNIFORM_BASE_SECONDS, name))
            for name in models if grew(UNIFORM_BASE_SECONDS, name) > 0}


def load(url: str, models: tuple[str, ...], mode: str, requests: int, max_tokens: int) -> list:
    settings = BenchSettings(url=url, models=models, base_model=SERVED_BASE_MODEL, mode=mode,
                             concurrency=STREAMS, requests=requests, max_tokens=max_tokens)

    async def measure() -> list:
        async with make_client(url, None, STREAMS) as client:
            return await run_bench(settings, client)

    return summarize(settings, asyncio.run(measure()))


def phases(url: str, requests: int, max_tokens: int) -> None:
    models = (SERVED_BASE_MODEL, *DEMO)
    before = counters(url)
    rows = {row.model: row for row in load(url, models, "phases", requests, max_tokens)}
    figures = engine_figures(before, counters(url), DEMO)
    print("\nphases: each model alone, four streams")
    print("| adapter | engine: added cost | of which DoRA | client A/B (TPOT p50) | "
          "difference |\n|---|---|---|---|---|")
    for name in DEMO:
        added, dora = figures[name]
        ab = rows[name].tpot_vs_base - 1
        print(f"| {name} | {added:+.1%} | {dora:+.1%} | {ab:+.1%} | {added - ab:+.1%} |")


def mixed(url: str, requests: int, max_tokens: int) -> None:
    before = counters(url)
    load(url, DEMO, "mixed", requests, max_tokens)
    after = counters(url)
    figures = engine_figures(before, after, DEMO)
    print("\nmixed: caps, pirate, brief, caps-lora interleaved, four streams")
    print("| adapter | engine: added cost | of which DoRA |\n|---|---|---|")
    for name in DEMO:
        print(f"| {name} | {figures[name][0]:+.1%} | {figures[name][1]:+.1%} |")
    mean = statistics.fmean(figure for figure, _ in figures.values())
    print(f"| mean (compare: step_cost's four / base - 1) | {mean:+.1%} | |")
    step_s = after[(STEP_SECONDS, "")] - before[(STEP_SECONDS, "")]
    count = after[("steps", "")] - before[("steps", "")]
    work_s = sum(after[key] - before.get(key, 0.0) for key in after if key[0] == SECONDS)
    print(f"\n{count:.0f} steps: mean step {step_s / count * 1e3:.1f} ms, of which adapter work "
          f"{work_s / count * 1e3:.1f} ms")
    meter(step_s / count)


def meter(mean_step_s: float) -> None:
    """The measuring's own cost per step of four DoRA groups, timed alone."""
    work = AdapterWork(STREAMS)

    def layer_statements() -> None:  # what `cpu_lora.add_groups` adds, per layer
        seconds, dora_seconds = work.seconds, work.dora_seconds
        last = perf_counter()
        for slot in range(STREAMS):
            scaling = perf_counter()
            dora_seconds[slot] += perf_counter() - scaling
            now = perf_counter()
            seconds[slot] += now - last
            last = now

    totals = StepTotals()
    groups = {name: (1, 0.001, 0.0001) for name in DEMO}

    def step() -> None:
        work.clear()
        start = perf_counter()
        for _ in range(LORA_LAYERS):
            layer_statements()
        totals.close_step(perf_counter() - start, STREAMS, True, groups)

    repeats = 200
    cost = min(timeit.repeat(step, number=repeats, repeat=5)) / repeats
    print(f"\nmeter: {cost * 1e6:.0f} us per step of {STREAMS} DoRA groups x {LORA_LAYERS} "
          f"layers; mean engine step {mean_step_s * 1e3:.1f} ms: {cost / mean_step_s:.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16, help="per model and part")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--compiled", action="store_true", help="vLLM's compiled mode")
    args = parser.parse_args()
    demo = paths.demo_adapters_dir()
    settings = EngineSettings(model=paths.default_model_dir(), max_loras=4, max_lora_rank=16,
                              compile=args.compiled,
                              lora_modules={name: demo / name for name in DEMO})
    with tempfile.TemporaryDirectory() as logs, \
            EngineProcess(settings, Path(logs) / "vllm.log") as engine:
        phases(engine.base_url, args.requests, args.max_tokens)
        mixed(engine.base_url, args.requests, args.max_tokens)


if __name__ == "__main__":
    main()
