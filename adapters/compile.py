"""Compiling an adapter against a base checkpoint: s and B~ per module, computed once."""

from __future__ import annotations

import hashlib
from pathlib import Path

from adapters.base_checkpoint import BaseCheckpoint
from adapters.base_fit import base_weight_name, check_fits
from adapters.compiled import FORMAT_VERSION, CompiledAdapter, CompiledModule, compiled_peft_config
from adapters.dora import dora_scale, fused_lora_b
from adapters.peft_adapter import CONFIG_FILE, WEIGHTS_FILE, PeftAdapter, read_adapter


def adapter_content_hash(directory: str | Path) -> str:
    """sha256 over the two files that define an adapter: same content, same hash."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest.update(name.encode() + b"\0")
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()


def compile_adapter(adapter: PeftAdapter, base: BaseCheckpoint, adapter_hash: str,
                    base_fingerprint: str) -> CompiledAdapter:
    """Validate `adapter` against `base`, then compute A, B~ and s per module in float32.

    Base weights are read one tensor at a time, as stored (their dtype is upcast here).
    """
    check_fits(adapter, base)
    settings = adapter.settings
    modules = {}
    for module, weights in adapter.modules.items():
        w0 = base.tensor(base_weight_name(module))
        if settings.fan_in_fan_out:
            w0 = w0.T
        scaling = settings.scaling_for(module)
        scale = (dora_scale(w0, weights.lora_a, weights.lora_b, weights.magnitude, scaling)
                 if adapter.is_dora else None)
        modules[module] = CompiledModule(
            lora_a=weights.lora_a.float(),
            fused_b=fused_lora_b(weights.lora_b, scaling, scale),
            scale=scale,
        )
    metadata = {
        "format_version": FORMAT_VERSION,
        "adapter_hash": adapter_hash,
        "base_fingerprint": base_fingerprint,
        "is_dora": adapter.is_dora,
        "source": str(adapter.directory),
    }
    return CompiledAdapter(metadata=metadata,
                           peft_config=compiled_peft_config(adapter.config, adapter.is_dora),
                           modules=modules)


def compile_directory(adapter_dir: str | Path, base: BaseCheckpoint) -> CompiledAdapter:
    """Read, validate and compile the adapter in `adapter_dir` (no store, no cache)."""
    return compile_adapter(read_adapter(adapter_dir), base,
                           adapter_content_hash(adapter_dir), base.fingerprint())
