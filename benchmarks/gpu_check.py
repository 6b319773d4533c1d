"""The GPU check: the plugin's DoRA scale step on CUDA, eager and in a CUDA graph.

For a GPU machine with torch but without vLLM or a network: it needs only torch and this
repository (the plugin's vLLM-free `batch_plan` and `scale_step`, run as they are). Per
model shape (SmolLM2-135M, Llama-3-8B), layer (qkv, o, gate_up, down) and batch of 1 to 256
tokens mixing base, LoRA and DoRA slots, one layer step is

    y = scale_rows(x @ W0.T, scales, plan.rows) + reference_lora(x)      (DoRA; LoRA skips
                                                                            the scale step)

where `reference_lora` is a plain, static-shape torch op of punica's semantics (every
slot's shrink, a per-token slot mask, every slot's expand: not vLLM's kernels, which need
vLLM). Checked, each against the formula evaluated one slot's tokens at a time:

- bf16 and fp32, eagerly;
- captured in a CUDA graph, then replayed after the batch plan, the scale table and the
  inputs were rewritten in place: the replay must follow the new values;

then timed (CUDA graph replays): DoRA's and LoRA's step per layer, and their ratio.

    python -m benchmarks.gpu_check [--budget-s 270]

Without CUDA it says so, runs the eager checks on the CPU at SmolLM2's shapes and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from adapters.vllm_plugin.batch_plan import BatchPlan
from adapters.vllm_plugin.scale_step import scale_rows

SLOTS = 4
RANK = 16
DORA_SLOTS = (1, 3)  # slots 0 and 2 hold plain LoRA adapters (scale rows of ones)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CPU_BATCHES = (1, 4, 16)
TIMED_REPLAYS = 50
# |got - want| <= RTOL * |want| + ATOL * max|want|, per layer output
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 2e-2)}


@dataclass(frozen=True)
class Layer:
    name: str
    in_features: int
    out_features: int


def decoder_layers(hidden: int, heads: int, kv_heads: int, head_dim: int,
                   intermediate: int) -> tuple[Layer, ...]:
    return (Layer("qkv", hidden, (heads + 2 * kv_heads) * head_dim),
            Layer("o", heads * head_dim, hidden),
            Layer("gate_up", hidden, 2 * intermediate),
            Layer("down", intermediate, hidden))


SHAPES = {
    "smollm2-135m": decoder_layers(576, 9, 3, 64, 1536),
    "llama-3-8b": decoder_layers(4096, 32, 8, 128, 14336),
}


class LayerStep:
    """One layer's weights, scale table and batch plan, all allocated once (on `device`,
    for batches of up to `max_tokens`); `run` writes `out` from `x` without allocating
    anything of a shape that depends on values."""

    def __init__(self, layer: Layer, max_tokens: int, dtype: torch.dtype,
                 device: torch.device, seed: int) -> None:
        self.layer = layer
        self.dtype = dtype
        self.generator = torch.Generator(device).manual_seed(seed)
        self.w0 = self.random(layer.out_features, layer.in_features,
                              std=layer.in_features ** -0.5)
        self.a = self.random(SLOTS * RANK, layer.in_features, std=layer.in_features ** -0.5)
        self.b = self.random(layer.out_features, SLOTS * RANK, std=0.05)
        self.scales = torch.ones(SLOTS + 1, layer.out_features, dtype=dtype, device=device)
        self.plan = BatchPlan(max_tokens, SLOTS, device)
        self.slot_of_column = torch.arange(SLOTS * RANK, device=device) // RANK

    def random(self, *shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.generator, device=self.generator.device)
                * std).to(self.dtype)

    def new_adapters(self) -> None:
        """New DoRA scales near 1, written in place (as the plugin fills a slot)."""
        for slot in DORA_SLOTS:
            self.scales[slot + 1].copy_(1 + 0.1 * self.random(self.scales.shape[1]))

    def new_batch(self, tokens: int) -> list[int]:
        """A batch of base (-1), LoRA and DoRA tokens, written into the plan in place."""
        slots = torch.randint(-1, SLOTS, (tokens,), generator=self.generator,
                              device=self.generator.device)
        listed = slots.tolist()
        self.plan.write(slots, set(listed), with_groups=False)
        return listed

    def run(self, x: torch.Tensor, out: torch.Tensor, dora: bool) -> None:
        """Semantics: out[t] = s_t * (W0 x_t) + B_t (A_t x_t), s_t = scales[rows[t]]
        (s_t = 1 when not `dora`; no LoRA term for base tokens)."""
        torch.matmul(x, self.w0.T, out=out)
        if dora:
            scale_rows(out, self.scales, self.plan.rows)
        slot_of_token = self.plan.rows[: x.shape[0]] - 1  # -1: the base model
        mask = (slot_of_token[:, None] == self.slot_of_column[None, :]).to(x.dtype)
        out.addmm_((x @ self.a.T) * mask, self.b.T)

    def expected(self, x: torch.Tensor, slots: list[int], dora: bool) -> torch.Tensor:
        """The formula, one slot's tokens at a time: float64 on the host, float32 (no TF32)
        on a GPU, where float64 at Llama-3-8B's widths would take minutes."""
        precision = torch.float64 if x.device.type == "cpu" else torch.float32
        w0, a, b, scales, x = (t.to(precision) for t in (self.w0, self.a, self.b,
                                                          self.scales, x))
        y = x @ w0.T
        for slot in sorted(set(slots) - {-1}):
            tokens = torch.tensor([t for t, s in enumerate(slots) if s == slot],
                                  device=x.device)
            columns = slice(slot * RANK, (slot + 1) * RANK)
            scale = scales[slot + 1] if dora else 1
            y[tokens] = scale * y[tokens] + (x[tokens] @ a[columns].T) @ b[:, columns].T
        return y


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, label: str) -> None:
    rtol, atol = TOLERANCE[dtype]
    error = (got.to(want.dtype) - want).abs()
    bound = rtol * want.abs() + atol * want.abs().max()
    if not bool((error <= bound).all()):
        raise AssertionError(f"{label}: max error {error.max().item():.3g} "
                             f"over a bound of {bound.max().item():.3g}")


def check_eager(step: LayerStep, tokens: int) -> None:
    step.new_adapters()
    for dora in (False, True):
        slots = step.new_batch(tokens)
        x = step.random(tokens, step.layer.in_features)
        out = torch.empty(tokens, step.layer.out_features, dtype=step.dtype,
                          device=x.device)
        step.run(x, out, dora)
        assert_close(out, step.expected(x, slots, dora), step.dtype,
                     f"{step.layer.name}, {tokens} tokens, {step.dtype}, "
                     f"{'DoRA' if dora else 'LoRA'}")


def captured(step: LayerStep, x: torch.Tensor, out: torch.Tensor,
             dora: bool) -> torch.cuda.CUDAGraph:
    """The step captured in a CUDA graph over the static `x` and `out`."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step.run(x, out, dora)  # warm-up outside the capture, as vLLM does
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step.run(x, out, dora)
    return graph


def check_and_time_graph(step: LayerStep, tokens: int) -> dict[str, float]:
    """Capture, rewrite the plan, the scales and the inputs in place, replay and check;
    then time replays. Returns µs per step for LoRA and DoRA."""
    x = step.random(tokens, step.layer.in_features)
    times = {}
    for dora in (False, True):
        out = torch.empty(tokens, step.layer.out_features, dtype=step.dtype, device=x.device)
        step.new_adapters()
        step.new_batch(tokens)
        graph = captured(step, x, out, dora)
        for _ in range(2):  # new values behind the captured addresses, then a replay
            step.new_adapters()
            slots = step.new_batch(tokens)
            x.copy_(step.random(*x.shape))
            graph.replay()
            torch.cuda.synchronize()
            assert_close(out, step.expected(x, slots, dora), step.dtype,
                         f"{step.layer.name}, {tokens} tokens, {step.dtype}, replayed")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TIMED_REPLAYS):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times["dora" if dora else "lora"] = start.elapsed_time(end) * 1000 / TIMED_REPLAYS
    return times


def run_on_gpu(deadline: float) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, in the step and checks
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape | layer | tokens | bf16 LoRA µs | bf16 DoRA µs | DoRA / LoRA |")
    print("|---|---|---|---|---|---|")
    for shape, layers in SHAPES.items():
        for layer in layers:
            steps = [LayerStep(layer, max(BATCHES), dtype, device, seed)
                     for seed, dtype in enumerate((torch.float32, torch.bfloat16))]
            for tokens in BATCHES:
                if time.monotonic() > deadline:
                    print("stopped: the time budget is spent")
                    return
                for step in steps:
                    check_eager(step, tokens)
                    times = check_and_time_graph(step, tokens)
                print(f"| {shape} | {layer.name} | {tokens} | {times['lora']:.1f} "
                      f"| {times['dora']:.1f} | {times['dora'] / times['lora']:.3f} |")
            del steps
            torch.cuda.empty_cache()


def run_on_cpu() -> None:
    print("CUDA is not available: the CUDA-graph checks and the timings need a GPU. "
          "Checking the eager step on the CPU at SmolLM2's shapes only.")
    for layer in SHAPES["smollm2-135m"]:
        for seed, dtype in enumerate((torch.float32, torch.bfloat16)):
            step = LayerStep(layer, max(CPU_BATCHES), dtype, torch.device("cpu"), seed)
            for tokens in CPU_BATCHES:
                check_eager(step, tokens)
    print("eager checks passed on the CPU")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=270,
                        help="stop starting new cases after this long (default 270)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if torch.cuda.is_available():
        run_on_gpu(started + args.budget_s)
    else:
        run_on_cpu()
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
