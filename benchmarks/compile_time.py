"""Benchmark: how long compiling an adapter takes (cold, and as a cache hit).

    python -m benchmarks.compile_time demo            # the demo adapters on the default model
    python -m benchmarks.compile_time llama3-8b DIR   # a synthetic Llama-3-8B base + r=16 DoRA

The Llama-3-8B case writes a bf16 checkpoint of the 32 layers' linear weights (~14 GB: only
what compile reads; embeddings, norms and lm_head are left out) to DIR, and deletes it after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters import paths
from adapters.base_checkpoint import BaseCheckpoint
from adapters.store import CompiledStore

LLAMA3_8B = {"hidden": 4096, "intermediate": 14336, "layers": 32, "kv": 1024, "rank": 16}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed_compile(store: CompiledStore, adapter: Path, base_dir: Path) -> str:
    """Seconds to fingerprint the base, to compile cold, and to hit the cache.

    The fingerprint is memoised per process, so the compile figures exclude hashing.
    """
    base = BaseCheckpoint(base_dir)
    started = time.perf_counter()
    base.fingerprint()
    hashed = time.perf_counter()
    assert not store.compile(adapter, base).cache_hit
    compiled = time.perf_counter()
    assert store.compile(adapter, base).cache_hit
    hit = time.perf_counter()
    return (f"base fingerprint {hashed - started:6.2f} s   compile {compiled - hashed:6.2f} s   "
            f"cache hit {hit - compiled:6.2f} s")


def bench_demo() -> None:
    base_dir = paths.default_model_dir()
    with tempfile.TemporaryDirectory() as store_dir:
        store = CompiledStore(store_dir)
        for adapter in sorted(p for p in paths.demo_adapters_dir().iterdir() if p.is_dir()
                              and (p / "adapter_config.json").is_file()):
            print(f"{adapter.name:10s} {timed_compile(store, adapter, base_dir)}")


def llama3_shapes() -> dict[str, tuple[int, int]]:
    h, i, kv = LLAMA3_8B["hidden"], LLAMA3_8B["intermediate"], LLAMA3_8B["kv"]
    attention = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}
    mlp = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    return {**{f"self_attn.{k}": v for k, v in attention.items()},
            **{f"mlp.{k}": v for k, v in mlp.items()}}


def write_llama3_base(directory: Path) -> None:
    """One bf16 shard per layer, with a shard index, like a Hugging Face checkpoint."""
    directory.mkdir(parents=True)
    weight_map = {}
    for layer in range(LLAMA3_8B["layers"]):
        shard = f"model-{layer:05d}.safetensors"
        tensors = {f"model.layers.{layer}.{name}.weight":
                   (torch.randn(shape) * 0.02).to(torch.bfloat16)
                   for name, shape in llama3_shapes().items()}
        save_file(tensors, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))


def write_llama3_adapter(directory: Path) -> None:
    rank = LLAMA3_8B["rank"]
    tensors = {}
    for layer in range(LLAMA3_8B["layers"]):
        for name, (out_features, in_features) in llama3_shapes().items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank) * 0.01
            tensors[f"{key}.lora_magnitude_vector"] = torch.rand(out_features) + 0.5
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_dora": True,
              "target_modules": LLAMA_TARGETS}
    (directory / "adapter_config.json").write_text(json.dumps(config))


def bench_llama3(work_dir: Path) -> None:
    work_dir = work_dir / "llama3-8b-bench"
    try:
        started = time.perf_counter()
        write_llama3_base(work_dir / "base")
        write_llama3_adapter(work_dir / "adapter")
        print(f"synthetic checkpoint written in {time.perf_counter() - started:.0f} s")
        figures = timed_compile(CompiledStore(work_dir / "store"), work_dir / "adapter",
                                work_dir / "base")
        print(f"llama3-8b r=16 DoRA, 224 modules: {figures}")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("case", choices=["demo", "llama3-8b"])
    parser.add_argument("work_dir", nargs="?", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    torch.manual_seed(0)
    bench_demo() if args.case == "demo" else bench_llama3(args.work_dir)


if __name__ == "__main__":
    main()
