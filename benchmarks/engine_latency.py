"""Benchmark: what DoRA costs inside vLLM, against plain LoRA with the same A and B.

    python -m benchmarks.engine_latency [--rounds 6] [--tokens 64]
                                        [--part engine|peft|all|paired] [--pairs 30]
                                        [--streams 1 4] [--pin]

One vLLM engine (CPU, float32, our plugin) serves the base model, a random r=8 DoRA adapter
on all linear layers of the default model, and its plain-LoRA twin (same A and B, no
magnitude). Streams are timed from the client: time to first token (TTFT) and time per
output token after the first (TPOT). Scenarios run interleaved, round by round, so that
drift on a shared machine hits every model alike. Then PEFT's own unmerged forward (base,
LoRA, DoRA, DoRA with PEFT's weight-norm caching) is timed on the same model for scale.
`--part paired` measures only DoRA against LoRA, in back-to-back pairs (order alternating):
each side's decode step is the median of its token-to-token intervals (robust to preempted
steps), the pair's ratio cancels the machine's drift, and the median of the pair ratios is
reported with a distribution-free 95% confidence interval (`benchmarks/paired_stats.py`).
`--pin` keeps vLLM's worker threads alone on CPU 0 (see `benchmarks/pinning.py`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from peft.helpers import DoraCaching
from transformers import AutoTokenizer

from adapters import paths
from benchmarks.paired_stats import median_with_interval
from benchmarks.pinning import pin_worker_apart
from gateway.engine.process import EngineProcess, EngineSettings
from gateway.telemetry.latency import carries_generated_text, time_per_output_token
from tests.factories import LLAMA_TARGETS, load_base, load_peft, random_adapter
from tests.test_engine_dora import without_magnitude

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
SCENARIOS = {
    "base x1": ["base"], "lora x1": ["lora"], "dora x1": ["dora"],
    "base x4": ["base"] * 4, "lora x4": ["lora"] * 4, "dora x4": ["dora"] * 4,
    "mixed x4 (base, lora, dora, dora)": ["base", "lora", "dora", "dora"],
}


@dataclass(frozen=True)
class Stream:
    """One streamed request: when it was sent and when each text chunk arrived (seconds)."""

    model: str
    sent: float
    stamps: tuple[float, ...]

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.sent

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        return time_per_output_token(self.stamps[0], self.stamps[-1], len(self.stamps))

    @property
    def intervals(self) -> list[float]:
        """Token-to-token times: one decode step each (the engine streams every step)."""
        return [later - earlier for earlier, later in itertools.pairwise(self.stamps)]


def stream_once(base_url: str, model: str, tokens: int) -> Stream:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "min_tokens": tokens,
            "ignore_eos": True, "temperature": 0, "stream": True}
    started = time.perf_counter()
    stamps = []
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and carries_generated_text(json.loads(line[6:])):
                stamps.append(time.perf_counter())
    return Stream(model, started, tuple(stamps))


def run_scenario(base_url: str, models: list[str], tokens: int) -> list[Stream]:
    results: list[Stream] = []

    def one(model: str) -> None:
        results.append(stream_once(base_url, model, tokens))

    threads = [threading.Thread(target=one, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=20)[int(q * 20) - 1] if len(values) > 1 else values[0]


def engine_settings(adapters: dict[str, Path], extra_env: dict[str, str]) -> EngineSettings:
    return EngineSettings(model=paths.default_model_dir(), max_loras=4, lora_modules=adapters,
                          extra_env=extra_env)


def bench_engine(settings: EngineSettings, rounds: int, tokens: int, log: Path) -> None:
    with EngineProcess(settings, log_path=log) as server:
        run_scenario(server.base_url, ["base", "lora", "dora"], 8)  # warm-up
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_index in range(rounds):
            names = list(SCENARIOS)
            names = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in names:
                for stream in run_scenario(server.base_url, SCENARIOS[name], tokens):
                    samples.setdefault((name, stream.model), []).append(
                        (stream.ttft, stream.tpot))
    print(f"{'scenario':36s} {'model':6s} {'n':>3s} {'TTFT p50':>9s} {'TTFT p95':>9s} "
          f"{'TPOT p50':>9s} {'TPOT p95':>9s}")
    for (name, model), values in samples.items():
        ttfts, tpots = [v[0] for v in values], [v[1] for v in values]
        print(f"{name:36s} {model:6s} {len(values):3d} {1e3 * statistics.median(ttfts):7.1f}ms "
              f"{1e3 * percentile(ttfts, 0.95):7.1f}ms {1e3 * statistics.median(tpots):7.1f}ms "
              f"{1e3 * percentile(tpots, 0.95):7.1f}ms")
    for streams in ("x1", "x4"):
        lora = statistics.median(v[1] for v in samples[(f"lora {streams}", "lora")])
        dora = statistics.median(v[1] for v in samples[(f"dora {streams}", "dora")])
        print(f"DoRA / LoRA median TPOT at {streams}: {dora / lora:.3f}")


def median_step(base_url: str, model: str, streams: int, tokens: int) -> float:
    """Median decode step of `streams` concurrent streams of `model`, over all their tokens."""
    return statistics.median(interval for stream in run_scenario(base_url, [model] * streams,
                                                                 tokens)
                             for interval in stream.intervals)


def bench_paired(settings: EngineSettings, pairs: int, tokens: int, streams: list[int],
                 log: Path) -> None:
    ratios: dict[int, list[float]] = {count: [] for count in streams}
    steps: dict[tuple[int, str], list[float]] = {}
    with EngineProcess(settings, log_path=log) as server:
        run_scenario(server.base_url, ["lora", "dora"], 8)  # warm-up
        for pair in range(pairs):
            order = ("lora", "dora") if pair % 2 == 0 else ("dora", "lora")
            for count, values in ratios.items():
                step = {model: median_step(server.base_url, model, count, tokens)
                        for model in order}
                values.append(step["dora"] / step["lora"])
                for model, seconds in step.items():
                    steps.setdefault((count, model), []).append(seconds)
    for count, values in ratios.items():
        median, low, high = median_with_interval(values)
        lora, dora = (1e3 * statistics.median(steps[(count, m)]) for m in ("lora", "dora"))
        print(f"{count} stream(s), {len(values)} pairs: median step LoRA {lora:.1f} ms, "
              f"DoRA {dora:.1f} ms; DoRA / LoRA per pair: median {median:.4f}, "
              f"95% CI {low:.4f} - {high:.4f}")


def peft_seconds_per_token(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        times.append((time.perf_counter() - started) / tokens)
    return statistics.median(times)


def bench_peft(adapters: dict[str, Path], tokens: int) -> None:
    base_dir = paths.default_model_dir()
    ids = AutoTokenizer.from_pretrained(base_dir)(PROMPT, return_tensors="pt").input_ids
    figures = {"base": peft_seconds_per_token(load_base(base_dir), ids, tokens),
               "lora": peft_seconds_per_token(load_peft(base_dir, adapters["lora"]), ids, tokens)}
    dora = load_peft(base_dir, adapters["dora"])
    figures["dora"] = peft_seconds_per_token(dora, ids, tokens)
    with DoraCaching():
        figures["dora, caching"] = peft_seconds_per_token(dora, ids, tokens)
    for name, seconds in figures.items():
        print(f"PEFT {name:14s} {1e3 * seconds:7.1f} ms/token   "
              f"x{seconds / figures['lora']:.2f} of LoRA")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--part", choices=["engine", "peft", "all", "paired"], default="all")
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4],
                        help="concurrent streams per side of a pair (paired part)")
    parser.add_argument("--pin", action="store_true",
                        help="vLLM's worker threads on CPU 0, everything else on CPU 1")
    args = parser.parse_args()
    extra_env = pin_worker_apart() if args.pin else {}
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        dora = random_adapter(paths.default_model_dir(), work_dir / "dora", r=8, lora_alpha=16,
                              target_modules=LLAMA_TARGETS, use_dora=True)
        adapters = {"dora": dora, "lora": without_magnitude(dora, work_dir / "lora")}
        if args.part in ("engine", "all"):
            bench_engine(engine_settings(adapters, extra_env), args.rounds, args.tokens,
                         work_dir / "vllm.log")
        if args.part in ("peft", "all"):
            bench_peft(adapters, args.tokens)
        if args.part == "paired":
            bench_paired(engine_settings(adapters, extra_env), args.pairs, args.tokens,
                         args.streams, work_dir / "vllm.log")


if __name__ == "__main__":
    main()
