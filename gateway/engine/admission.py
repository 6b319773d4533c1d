"""Admission: what the configured engines would refuse about an adapter, known before it is
registered.

Validation (`adapters.peft_adapter`, `adapters.base_fit`) says whether an adapter is a sound
PEFT adapter for the base model; admission adds what vLLM and the DoRA plugin refuse at load
time, so such an adapter is turned away when it is added rather than on a user's request:
vLLM's rank limit and the PEFT features it refuses (`PEFTHelper.validate_legal`), and the
layers on which the plugin cannot apply a DoRA scale (MoE experts and routers, quantized
layers, fully sharded LoRA; `adapters.vllm_plugin.layers.dora_unsupported_reason`). Only the
adapter's config and the names in its safetensors header are read.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from adapters.base_checkpoint import BaseCheckpoint
from adapters.base_fit import check_fits
from adapters.errors import AdapterError
from adapters.peft_adapter import CONFIG_FILE, KEY_PREFIX, TENSOR_ROLES, WEIGHTS_FILE, read_adapter
from gateway.engine.limits import EngineLimits

# vLLM 0.32's PEFTHelper: inits that only set the starting weights; the others (PiSSA, OLoRA,
# CorDA, LoftQ) change the base weights, which a server of the unmodified base cannot honour.
SERVABLE_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
REFUSED_FEATURES = {"use_qalora": "QALoRA", "use_bdlora": "block-diagonal LoRA (BD-LoRA)"}
MOE_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
SHOWN_MODULES = 3


def engine_refusals(directory: Path, base: BaseCheckpoint, limits: EngineLimits) -> list[str]:
    """Every reason the engines would refuse the adapter in `directory` (empty: none found;
    an unreadable adapter yields none here and is reported by validation)."""
    config = _config(directory)
    if config is None:
        return []
    problems = _rank_problems(config, limits) + _feature_problems(config)
    if config.get("use_dora"):
        problems += _dora_problems(_module_names(directory), base, limits)
    return problems


def validation_problems(directory: Path, base: BaseCheckpoint) -> list[str]:
    """What validation finds wrong, for a refusal that lists every reason at once."""
    try:
        check_fits(read_adapter(directory), base)
    except AdapterError as exc:
        return exc.problems
    return []


def _config(directory: Path) -> dict | None:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _rank_problems(config: dict, limits: EngineLimits) -> list[str]:
    """vLLM compares the largest of `r` and the `rank_pattern` ranks with its limit."""
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    ranks = [rank for rank in ranks if isinstance(rank, int) and not isinstance(rank, bool)]
    if not ranks or max(ranks) <= limits.max_lora_rank:
        return []
    return [f"LoRA rank {max(ranks)} is greater than max_lora_rank {limits.max_lora_rank} "
            f"({limits.source}): use an adapter of rank <= {limits.max_lora_rank}, or serve "
            f"with a larger max_lora_rank"]


def _feature_problems(config: dict) -> list[str]:
    problems = []
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in SERVABLE_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base model's weights, and vLLM "
                        f"serves the unmodified base: convert the adapter with PEFT's "
                        f"path_initial_model_for_weight_conversion")
    problems += [f"vLLM does not support {name}" for key, name in REFUSED_FEATURES.items()
                 if config.get(key)]
    return problems


def _dora_problems(modules: list[str], base: BaseCheckpoint, limits: EngineLimits) -> list[str]:
    problems = []
    if limits.quantization:
        problems.append(f"DoRA is not supported on quantized base layers (the engine runs "
                        f"with --quantization {limits.quantization})")
    if limits.fully_sharded_loras:
        problems.append("DoRA is not supported with fully sharded LoRA (the engine runs with "
                        "--fully-sharded-loras)")
    experts = [module for module in modules if "experts" in module.split(".")]
    if experts:
        problems.append(f"DoRA is not supported on MoE expert layers (vLLM runs them as one "
                        f"fused MoE layer): {_summarise(experts)}")
    routers = [module for module in modules if module.rsplit(".", 1)[-1] == "gate"]
    if routers and _is_moe(base):
        problems.append(f"DoRA is not supported on MoE routers (replicated linear layers): "
                        f"{_summarise(routers)}")
    return problems


def _module_names(directory: Path) -> list[str]:
    """The adapted modules named in the weights file's header (no tensor is read)."""
    try:
        with safe_open(directory / WEIGHTS_FILE, framework="pt") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError):
        return []
    modules = set()
    for key in keys:
        for suffix in TENSOR_ROLES:
            if key.startswith(KEY_PREFIX) and key.endswith("." + suffix):
                modules.add(key[len(KEY_PREFIX):-len(suffix) - 1])
    return sorted(modules)


def _is_moe(base: BaseCheckpoint) -> bool:
    config = base.config.get("text_config", base.config)
    return any(config.get(key) for key in MOE_EXPERT_COUNTS)


def _summarise(modules: list[str]) -> str:
    more = f" and {len(modules) - SHOWN_MODULES} more" if len(modules) > SHOWN_MODULES else ""
    return ", ".join(modules[:SHOWN_MODULES]) + more
