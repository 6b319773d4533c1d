"""Reading and validating a PEFT LoRA / DoRA adapter directory.

Everything wrong with an adapter is collected and raised as one `AdapterError`, so a user
fixes all of it in one go. Only `adapter_config.json` and `adapter_model.safetensors` are
read; pickle-based weights are refused, and nothing outside the directory is opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from adapters.errors import AdapterError
from adapters.peft_config import EMBEDDING_MODULE_SUFFIXES, LoraSettings, parse_lora_settings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
KEY_PREFIX = "base_model.model."
TENSOR_ROLES = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_magnitude_vector": "m",
    "lora_magnitude_vector.weight": "m",
}


@dataclass(frozen=True)
class ModuleWeights:
    """One adapted linear layer: A [r, in], B [out, r] and, for DoRA, m [out]."""

    module: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    magnitude: torch.Tensor | None


@dataclass(frozen=True)
class PeftAdapter:
    """A parsed adapter directory; tensors as stored (dtype untouched)."""

    directory: Path
    config: dict
    settings: LoraSettings
    modules: dict[str, ModuleWeights]

    @property
    def is_dora(self) -> bool:
        return self.settings.use_dora


def read_adapter(directory: str | Path) -> PeftAdapter:
    """Parse and validate the adapter in `directory` on its own (no base model needed)."""
    directory = Path(directory)
    source = str(directory)
    problems = _file_problems(directory)
    if problems:
        raise AdapterError(source, problems)
    config, problems = _read_config(directory / CONFIG_FILE)
    settings, config_problems = parse_lora_settings(config) if config else (None, [])
    problems += config_problems
    tensors, tensor_problems = _read_tensors(directory / WEIGHTS_FILE)
    problems += tensor_problems
    if settings is None or problems:
        raise AdapterError(source, problems)
    modules, problems = _group_modules(tensors, settings)
    if problems:
        raise AdapterError(source, problems)
    return PeftAdapter(directory=directory.resolve(), config=config, settings=settings,
                       modules=modules)


def _file_problems(directory: Path) -> list[str]:
    if not directory.is_dir():
        return [f"{directory} is not a directory"]
    problems = []
    root = os.path.realpath(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = directory / name
        if not path.is_file():
            problems.append(f"missing {name}")
        elif os.path.commonpath([root, os.path.realpath(path)]) != root:
            problems.append(f"{name} links outside the adapter directory")
    if not (directory / WEIGHTS_FILE).is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            problems.append(f"pickle-based weights are refused ({', '.join(pickled)}): "
                            f"save the adapter with safe_serialization=True")
    return problems


def _read_config(path: Path) -> tuple[dict, list[str]]:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return {}, [f"{CONFIG_FILE} is not valid JSON: {exc}"]
    if not isinstance(config, dict):
        return {}, [f"{CONFIG_FILE} must hold a JSON object"]
    return config, []


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    try:
        with safe_open(path, framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        return {}, [f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}"]
    problems = []
    for name, tensor in sorted(tensors.items()):
        if not tensor.is_floating_point():
            problems.append(f"{name}: dtype {tensor.dtype} is not a floating-point type")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{name}: contains NaN or Inf")
    return tensors, problems


def _split_key(key: str) -> tuple[str, str] | None:
    """`base_model.model.<module>.<role suffix>` -> (module, role), or None if unknown."""
    if not key.startswith(KEY_PREFIX):
        return None
    rest = key[len(KEY_PREFIX):]
    for suffix, role in TENSOR_ROLES.items():
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], role
    return None


def _group_modules(
    tensors: dict[str, torch.Tensor], settings: LoraSettings
) -> tuple[dict[str, ModuleWeights], list[str]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            problems.append(f"unexpected tensor {key!r} (embedding LoRA and extra weights "
                            f"are not supported)")
            continue
        module, role = split
        grouped.setdefault(module, {})[role] = tensor
    if not grouped and not problems:
        problems.append(f"{WEIGHTS_FILE} holds no LoRA tensors")
    modules = {}
    for module, parts in sorted(grouped.items()):
        module_problems = _module_problems(module, parts, settings)
        problems += module_problems
        if not module_problems:
            modules[module] = ModuleWeights(module, parts["A"], parts["B"], parts.get("m"))
    return modules, problems


def _module_problems(module: str, parts: dict[str, torch.Tensor],
                     settings: LoraSettings) -> list[str]:
    problems = [f"{module}: missing lora_{role}" for role in ("A", "B") if role not in parts]
    if settings.use_dora and "m" not in parts:
        problems.append(f"{module}: missing lora_magnitude_vector (the adapter says use_dora)")
    if not settings.use_dora and "m" in parts:
        problems.append(f"{module}: has a magnitude vector but use_dora is false")
    if not settings.targets(module):
        problems.append(f"{module}: not selected by target_modules {settings.target_modules!r}")
    if module.rsplit(".", 1)[-1] in EMBEDDING_MODULE_SUFFIXES:
        kind = "DoRA" if settings.use_dora else "LoRA"
        problems.append(f"{module}: {kind} on embeddings or lm_head is not supported")
    if problems:
        return problems
    rank = settings.rank_for(module)
    a, b, m = parts["A"], parts["B"], parts.get("m")
    if a.dim() != 2 or a.shape[0] != rank:
        problems.append(f"{module}: lora_A has shape {tuple(a.shape)}, expected [{rank}, in]")
    if b.dim() != 2 or b.shape[1] != rank:
        problems.append(f"{module}: lora_B has shape {tuple(b.shape)}, expected [out, {rank}]")
    if m is not None and (m.dim() != 1 or (b.dim() == 2 and m.shape[0] != b.shape[0])):
        problems.append(f"{module}: magnitude has shape {tuple(m.shape)}, expected [{b.shape[0]}]")
    return problems
