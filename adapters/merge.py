"""Merging one adapter into a full model directory, for single-adapter deployments.

The merged weight is diag(s) @ (W0 + g * B @ A), exactly PEFT's `merge_and_unload`. Weight
files are rewritten one at a time with the same sharding; every other file of the base
(config, tokenizer, generation config) is copied. The output appears atomically.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.base_checkpoint import BaseCheckpoint
from adapters.base_fit import base_weight_name
from adapters.compile import adapter_content_hash, compile_adapter
from adapters.compiled import CompiledAdapter
from adapters.dora import merged_weight
from adapters.errors import DoraGatewayError
from adapters.peft_adapter import PICKLE_SUFFIXES, read_adapter


def merge_adapter(adapter_dir: str | Path, base_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter merged to `out_dir` (which must not exist yet); return it."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists():
        raise DoraGatewayError(f"{out_dir} already exists; choose a new output directory")
    base = BaseCheckpoint(base_dir)
    adapter = read_adapter(adapter_dir)
    compiled = compile_adapter(adapter, base, adapter_content_hash(adapter_dir), base.fingerprint())
    fan_in_fan_out = adapter.settings.fan_in_fan_out
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        _copy_side_files(base, staging)
        for file_name in base.weight_files:
            tensors = dict(base.tensors_of_file(file_name))
            _merge_into(tensors, compiled, fan_in_fan_out)
            save_file(tensors, staging / file_name, metadata={"format": "pt"})
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _merge_into(tensors: dict[str, torch.Tensor], compiled: CompiledAdapter,
                fan_in_fan_out: bool) -> None:
    """Replace, in place, each adapted base weight of one file by its merged weight."""
    for module, layer in compiled.modules.items():
        name = base_weight_name(module)
        if name not in tensors:
            continue
        stored = tensors[name]
        w0 = stored.T if fan_in_fan_out else stored
        merged = merged_weight(w0, layer.lora_a, layer.fused_b, layer.scale)
        merged = merged.T if fan_in_fan_out else merged
        tensors[name] = merged.to(stored.dtype).contiguous()


def _copy_side_files(base: BaseCheckpoint, staging: Path) -> None:
    weight_files = set(base.weight_files)
    for path in base.directory.iterdir():
        if path.is_file() and path.name not in weight_files and path.suffix not in PICKLE_SUFFIXES:
            shutil.copy2(path, staging / path.name)
