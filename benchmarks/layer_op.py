"""Benchmark: the plugin's layer op alone, a DoRA slot against a LoRA slot and the base
model, at real shapes.

    python -m benchmarks.layer_op [--shapes llama3-8b|smollm2-135m] [--tokens 1 16 64 256]
                                  [--rank 16] [--seconds 40] [--stock]

vLLM's own LoRA layers, patched by this plugin, wrap the four linear layers of one decoder
block (qkv, o, gate_up, down; float32, random weights, prepared by vLLM's CPU GEMM dispatch as
in the engine) of Llama-3-8B or of the default model, SmolLM2-135M. Slot 0 holds a LoRA
adapter and slot 1 a DoRA adapter with the same A and B, so both do the same LoRA work and
differ only by the scale step. Every repeat times each case once per layer, in an order that
rotates (drift hits all cases alike):
  base   no token has an adapter
  lora   every token uses the LoRA slot
  dora   every token uses the DoRA slot
  mixed  LoRA and DoRA tokens alternate
Batches are decode batches (one token per sequence); "block" is the sum of the four layers.
By default the layers run the plugin's grouped CPU LoRA path (`adapters/vllm_plugin/
cpu_lora.py`); `--stock` runs vLLM's own CPU LoRA ops instead (the DoRA scale as a separate
step), for comparison. The DoRA / LoRA ratio is taken per repeat and reported as a median with a
distribution-free 95% interval (`benchmarks/paired_stats.py`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase

import adapters.vllm_plugin as plugin
from benchmarks.paired_stats import median_with_interval
from tests.vllm_layers import (
    DORA_SLOT,
    LORA_SLOT,
    BlockShapes,
    load_slot,
    lora_block,
    random_slot_weights,
    select_batch,
    single_process_vllm,
)

CASES = ("base", "lora", "dora", "mixed")
MEASUREMENT_SECONDS = 0.002
HEADER = ("tokens", "layer", "repeats", "base ms", "LoRA ms", "DoRA ms", "mixed ms",
          "LoRA / base", "DoRA / LoRA (95% CI)", "mixed / LoRA")
SHAPES = {
    "llama3-8b": BlockShapes(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128),
    "smollm2-135m": BlockShapes(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64),
}


def case_slots(case: str, tokens: int) -> list[int | None]:
    if case == "mixed":
        return [LORA_SLOT if t % 2 == 0 else DORA_SLOT for t in range(tokens)]
    return [{"base": None, "lora": LORA_SLOT, "dora": DORA_SLOT}[case]] * tokens


def calls_per_measurement(layer: BaseLinearLayerWithLoRA, x: torch.Tensor) -> int:
    """Enough calls to fill MEASUREMENT_SECONDS, so the timer's resolution does not matter."""
    layer.apply(x)
    return max(1, math.ceil(MEASUREMENT_SECONDS / seconds_per_call(layer, x, 1)))


def seconds_per_call(layer: BaseLinearLayerWithLoRA, x: torch.Tensor, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        layer.apply(x)
    return (time.perf_counter() - started) / calls


Times = dict[str, dict[str, list[float]]]  # layer -> case -> seconds per call, per repeat


def bench_tokens(layers: dict[str, BaseLinearLayerWithLoRA], wrapper: PunicaWrapperBase,
                 tokens: int, seconds: float, generator: torch.Generator) -> None:
    inputs = {name: torch.randn(tokens, layer.input_size, generator=generator)
              for name, layer in layers.items()}
    times = measure(layers, wrapper, inputs, tokens, seconds)
    times["block"] = {case: [sum(per_layer) for per_layer in
                             zip(*(times[name][case] for name in layers), strict=True)]
                      for case in CASES}
    for name, series in times.items():
        report(name, tokens, series)


def measure(layers: dict[str, BaseLinearLayerWithLoRA], wrapper: PunicaWrapperBase,
            inputs: dict[str, torch.Tensor], tokens: int, seconds: float) -> Times:
    """Every case once per layer and repeat, in an order that rotates with the repeat, for
    about `seconds` (at least 6 repeats, the fewest a 95% interval can be drawn from)."""
    select_batch(wrapper, case_slots("lora", tokens))
    calls = {name: calls_per_measurement(layer, inputs[name]) for name, layer in layers.items()}
    times: Times = {name: {case: [] for case in CASES} for name in layers}
    deadline = time.perf_counter() + seconds
    repeat = 0
    while repeat < 6 or time.perf_counter() < deadline:
        for case in CASES[repeat % len(CASES):] + CASES[:repeat % len(CASES)]:
            select_batch(wrapper, case_slots(case, tokens))
            for name, layer in layers.items():
                layer.apply(inputs[name])  # warm the caches this case touches
                times[name][case].append(seconds_per_call(layer, inputs[name], calls[name]))
        repeat += 1
    return times


def report(name: str, tokens: int, series: dict[str, list[float]]) -> None:
    medians = {case: 1e3 * statistics.median(values) for case, values in series.items()}
    dora, low, high = median_with_interval(
        [d / lo for d, lo in zip(series["dora"], series["lora"], strict=True)])
    mixed = statistics.median(m / lo for m, lo in zip(series["mixed"], series["lora"],
                                                      strict=True))
    lora = statistics.median(lo / b for lo, b in zip(series["lora"], series["base"],
                                                     strict=True))
    cells = [str(tokens), name, str(len(series["lora"])),
             *(f"{medians[case]:.3f}" for case in CASES), f"{lora:.4f}",
             f"**{dora:.4f}** ({low:.4f} - {high:.4f})", f"{mixed:.4f}"]
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=SHAPES, default="llama3-8b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=40,
                        help="time budget per token count (all cases, all layers)")
    parser.add_argument("--stock", action="store_true",
                        help="vLLM's own CPU LoRA ops instead of the plugin's grouped path")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    plugin.register()
    with single_process_vllm(), torch.inference_mode():
        block = lora_block(SHAPES[args.shapes], args.rank, max(args.tokens), generator)
        for layer in block.layers.values():
            layer.dora_cpu_lora = not args.stock
            a, b, s = random_slot_weights(layer, args.rank, generator)
            load_slot(layer, LORA_SLOT, a, b, None)
            load_slot(layer, DORA_SLOT, a, b, s)
        print(f"{args.shapes}, rank {args.rank}, {'stock' if args.stock else 'grouped'} LoRA"
              f" path, torch {torch.__version__}, {torch.get_num_threads()} threads")
        print(f"| {' | '.join(HEADER)} |\n|{'---|' * len(HEADER)}")
        for tokens in args.tokens:
            bench_tokens(block.layers, block.wrapper, tokens, args.seconds, generator)


if __name__ == "__main__":
    main()
