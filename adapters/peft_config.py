"""The parts of a PEFT `adapter_config.json` that decide what an adapter computes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

EMBEDDING_MODULE_SUFFIXES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in")


@dataclass(frozen=True)
class LoraSettings:
    """Rank, alpha and layout of a LoRA or DoRA adapter, with PEFT's per-module overrides."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str | None
    use_dora: bool = False
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def rank_for(self, module: str) -> int:
        """The rank PEFT gives `module` (full dotted name, e.g. `model.layers.0.mlp.up_proj`)."""
        key = _pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module: str) -> float:
        """g = alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT `LoraLayer.update_layer`)."""
        rank = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str) -> bool:
        """Whether `target_modules` selects `module`, as PEFT's `check_target_module_exists`."""
        targets = self.target_modules
        if targets is None:
            return False
        if isinstance(targets, str):
            if targets == "all-linear":
                return not module.endswith("lm_head")
            return re.fullmatch(targets, module) is not None
        return module in targets or any(module.endswith(f".{t}") for t in targets)


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The first pattern matching `module`, as PEFT's `get_pattern_key` (suffix regex match)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def parse_lora_settings(config: dict[str, Any]) -> tuple[LoraSettings | None, list[str]]:
    """Read the settings from a parsed config, and list every unsupported or invalid field."""
    problems = _unsupported_features(config)
    r = config.get("r")
    alpha = config.get("lora_alpha", r)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        problems.append(f"'lora_alpha' must be a number, got {alpha!r}")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if any(not isinstance(v, int) or v <= 0 for v in rank_pattern.values()):
        problems.append("'rank_pattern' values must be positive integers")
    if problems:
        return None, problems
    settings = LoraSettings(
        r=r,
        lora_alpha=alpha,
        target_modules=config.get("target_modules"),
        use_dora=bool(config.get("use_dora", False)),
        use_rslora=bool(config.get("use_rslora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern),
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )
    return settings, []


def _unsupported_features(config: dict[str, Any]) -> list[str]:
    """Features that change what an adapter computes in ways we do not serve exactly."""
    problems = []
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        problems.append(f"peft_type {peft_type!r} is not supported (only LORA, DoRA or not)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save is not supported: {config['modules_to_save']}")
    if config.get("lora_bias"):
        problems.append("lora_bias is not supported")
    for name in ("target_parameters", "trainable_token_indices", "layer_replication"):
        if config.get(name):
            problems.append(f"{name} is not supported")
    if config.get("alora_invocation_tokens"):
        problems.append("activated LoRA (alora_invocation_tokens) is not supported")
    return problems
