"""The compiled adapter: per module A, the fused B~ and (DoRA only) the scale s.

On disk it is a PEFT-shaped LoRA directory, so vLLM's own loader reads A and B~:

    adapter_config.json         r, rank_pattern as trained; alpha = r, so vLLM's g is 1
    adapter_model.safetensors   <key>.lora_A.weight = A, <key>.lora_B.weight = B~ (float32)
    dora_scales.safetensors     <key>.dora_scale = s (DoRA only)
    dora_gateway.json           format version, adapter content hash, base fingerprint

A compiled DoRA adapter keeps `use_dora: true`, so a vLLM without our plugin refuses it
instead of serving B~ without s (fail closed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters.errors import AdapterError
from adapters.peft_adapter import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE

FORMAT_VERSION = 1
SCALES_FILE = "dora_scales.safetensors"
METADATA_FILE = "dora_gateway.json"


@dataclass(frozen=True)
class CompiledModule:
    """A [r, in], fused_b [out, r], scale [out] or None (plain LoRA); all float32."""

    lora_a: torch.Tensor
    fused_b: torch.Tensor
    scale: torch.Tensor | None


@dataclass(frozen=True)
class CompiledAdapter:
    metadata: dict
    peft_config: dict
    modules: dict[str, CompiledModule]

    @property
    def is_dora(self) -> bool:
        return bool(self.metadata["is_dora"])


def compiled_peft_config(trained: dict, is_dora: bool) -> dict:
    """The trained config with g folded into B~: alpha = r per module, no rsLoRA, no fan-in."""
    rank_pattern = dict(trained.get("rank_pattern") or {})
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": trained.get("base_model_name_or_path"),
        "target_modules": trained.get("target_modules"),
        "r": trained["r"],
        "lora_alpha": trained["r"],
        "rank_pattern": rank_pattern,
        "alpha_pattern": rank_pattern,
        "use_rslora": False,
        "use_dora": is_dora,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
    }


def write_compiled(adapter: CompiledAdapter, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    weights, scales = {}, {}
    for module, compiled in adapter.modules.items():
        key = KEY_PREFIX + module
        weights[f"{key}.lora_A.weight"] = compiled.lora_a.contiguous()
        weights[f"{key}.lora_B.weight"] = compiled.fused_b.contiguous()
        if compiled.scale is not None:
            scales[f"{key}.dora_scale"] = compiled.scale.contiguous()
    save_file(weights, directory / WEIGHTS_FILE)
    if scales:
        save_file(scales, directory / SCALES_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(adapter.peft_config, indent=2))
    (directory / METADATA_FILE).write_text(json.dumps(adapter.metadata, indent=2))


def read_compiled(directory: str | Path) -> CompiledAdapter:
    directory = Path(directory)
    try:
        metadata = json.loads((directory / METADATA_FILE).read_text())
        peft_config = json.loads((directory / CONFIG_FILE).read_text())
        weights = load_file(directory / WEIGHTS_FILE)
        scales = load_file(directory / SCALES_FILE) if metadata["is_dora"] else {}
    except (OSError, ValueError, KeyError) as exc:
        raise AdapterError(str(directory), [f"not a compiled adapter: {exc}"]) from exc
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterError(str(directory), [
            f"compiled with format {metadata.get('format_version')}, expected {FORMAT_VERSION}"])
    modules = {}
    for name in weights:
        if name.endswith(".lora_A.weight"):
            key = name[: -len(".lora_A.weight")]
            modules[key[len(KEY_PREFIX):]] = CompiledModule(
                lora_a=weights[name],
                fused_b=weights[f"{key}.lora_B.weight"],
                scale=scales.get(f"{key}.dora_scale"),
            )
    return CompiledAdapter(metadata=metadata, peft_config=peft_config, modules=modules)


def is_compiled(directory: str | Path) -> bool:
    return (Path(directory) / METADATA_FILE).is_file()
