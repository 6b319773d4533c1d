"""Benchmark: what DoRA costs inside vLLM, against plain LoRA with the same A and B.

    python -m benchmarks.engine_latency [--rounds 6] [--tokens 64]
                                        [--part engine|peft|all|paired] [--pairs 12] [--pin]

One vLLM engine (CPU, float32, our plugin) serves the base model, a random r=8 DoRA adapter
on all linear layers of the default model, and its plain-LoRA twin (same A and B, no
magnitude). Streams are timed from the client: time to first token (TTFT) and time per
output token after the first (TPOT). Scenarios run interleaved, round by round, so that
drift on a shared machine hits every model alike. Then PEFT's own unmerged forward (base,
LoRA, DoRA, DoRA with PEFT's weight-norm caching) is timed on the same model for scale.
`--part paired` measures only DoRA against LoRA, in back-to-back pairs (order alternating),
and reports the median of the per-pair ratios: the machine's drift cancels within a pair.
`--pin` keeps vLLM's worker threads alone on CPU 0 (see `benchmarks/pinning.py`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from peft.helpers import DoraCaching
from transformers import AutoTokenizer

from adapters import paths
from benchmarks.pinning import pin_worker_apart
from gateway.vllm_process import EngineSettings, VllmServer
from tests.factories import LLAMA_TARGETS, load_base, load_peft, random_adapter
from tests.test_engine_dora import without_magnitude

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
SCENARIOS = {
    "base x1": ["base"], "lora x1": ["lora"], "dora x1": ["dora"],
    "base x4": ["base"] * 4, "lora x4": ["lora"] * 4, "dora x4": ["dora"] * 4,
    "mixed x4 (base, lora, dora, dora)": ["base", "lora", "dora", "dora"],
}


def stream_once(base_url: str, model: str, tokens: int) -> tuple[float, float]:
    """(TTFT seconds, mean seconds per output token after the first) of one stream."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "min_tokens": tokens,
            "ignore_eos": True, "temperature": 0, "stream": True}
    started = time.perf_counter()
    stamps = []
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return stamps[0] - started, (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def run_scenario(base_url: str, models: list[str], tokens: int) -> list[tuple[str, float, float]]:
    results: list[tuple[str, float, float]] = []

    def one(model: str) -> None:
        results.append((model, *stream_once(base_url, model, tokens)))

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
    with VllmServer(settings, log_path=log) as server:
        run_scenario(server.base_url, ["base", "lora", "dora"], 8)  # warm-up
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_index in range(rounds):
            names = list(SCENARIOS)
            names = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in names:
                for model, ttft, tpot in run_scenario(server.base_url, SCENARIOS[name], tokens):
                    samples.setdefault((name, model), []).append((ttft, tpot))
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


def bench_paired(settings: EngineSettings, pairs: int, tokens: int, log: Path) -> None:
    ratios: dict[int, list[float]] = {1: [], 4: []}
    with VllmServer(settings, log_path=log) as server:
        run_scenario(server.base_url, ["lora", "dora"], 8)  # warm-up
        for pair in range(pairs):
            order = ("lora", "dora") if pair % 2 == 0 else ("dora", "lora")
            for streams, values in ratios.items():
                tpot = {model: statistics.median(
                    result[2] for result in run_scenario(server.base_url, [model] * streams,
                                                         tokens)) for model in order}
                values.append(tpot["dora"] / tpot["lora"])
    for streams, values in ratios.items():
        low, _, high = statistics.quantiles(values, n=4)
        print(f"DoRA / LoRA TPOT, {streams} stream(s), {len(values)} pairs: median "
              f"{statistics.median(values):.4f} (quartiles {low:.4f} - {high:.4f})")


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
    parser.add_argument("--pairs", type=int, default=12)
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
                         work_dir / "vllm.log")


if __name__ == "__main__":
    main()
