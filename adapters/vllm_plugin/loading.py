"""Loading DoRA adapters in vLLM's worker: fetch, compile PEFT directories, read the scales.

An `s3://` path is fetched into the host's cache first (`fetching.py`). A plain PEFT DoRA
directory is compiled once (cached in the compiled store) against the served base model (a
local directory, or a Hub id whose snapshot vLLM downloaded); vLLM then loads the compiled
artifact as the LoRA (A, B~), and the scales `s` ride along on the `LoRAModel` as
`dora_scales` (vLLM module name -> [out]).
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import torch
from safetensors.torch import load_file
from vllm.config import CompilationMode
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.request import LoRARequest
from vllm.lora.utils import get_adapter_absolute_path, parse_fine_tuned_lora_name
from vllm.lora.worker_manager import WorkerLoRAManager
from vllm.platforms import current_platform

from adapters import paths
from adapters.base_checkpoint import BaseCheckpoint
from adapters.compiled import SCALES_FILE, is_compiled
from adapters.errors import BaseModelError, DoraGatewayError
from adapters.hub import local_snapshot
from adapters.peft_adapter import CONFIG_FILE
from adapters.plugin_env import FETCH_FAILED
from adapters.store import CompiledStore
from adapters.vllm_plugin.fetching import HeldTrees, is_remote
from adapters.vllm_plugin.layers import dora_unsupported_reason
from adapters.vllm_plugin.vocab_lora import vocab_refusal

SCALE_SUFFIX = ".dora_scale"


def _is_peft_dora(directory: Path) -> bool:
    try:
        return bool(json.loads((directory / CONFIG_FILE).read_text()).get("use_dora"))
    except (OSError, ValueError):
        return False


def servable_path(lora_path: str, base_model: str, revision: str | None = None) -> str:
    """The directory vLLM should load: a PEFT DoRA directory becomes its compiled artifact.
    `base_model` is vLLM's model: a directory, or a Hub id (at `revision`)."""
    directory = Path(lora_path)
    if is_compiled(directory) or not _is_peft_dora(directory):
        return lora_path
    try:
        entry = CompiledStore(paths.compiled_store_dir()).compile(
            directory, _base_checkpoint(base_model, revision))
    except DoraGatewayError as exc:
        raise ValueError(str(exc)) from exc
    return str(entry.path)


_BASES: dict[tuple[str, str | None], BaseCheckpoint] = {}


def _base_checkpoint(base_model: str, revision: str | None) -> BaseCheckpoint:
    """One per base model and process, so its fingerprint is computed once."""
    if (base_model, revision) not in _BASES:
        directory = Path(base_model)
        if not directory.is_dir():
            try:
                directory = local_snapshot(base_model, revision)
            except BaseModelError as exc:
                raise ValueError(f"cannot compile a DoRA adapter: {exc}") from exc
        _BASES[base_model, revision] = BaseCheckpoint(directory)
    return _BASES[base_model, revision]


def read_scales(compiled_dir: str, weights_mapper) -> dict[str, torch.Tensor]:
    """vLLM module name -> s, named exactly as vLLM names the module's LoRA weights."""
    path = Path(compiled_dir) / SCALES_FILE
    if not path.is_file():
        return {}
    scales = {}
    for key, scale in load_file(path).items():
        lora_a_name = key.removesuffix(SCALE_SUFFIX) + ".lora_A.weight"
        module_name, _ = parse_fine_tuned_lora_name(lora_a_name, weights_mapper)
        scales[module_name] = scale
    return scales


def check_servable(manager, lora: LoRAModel) -> None:
    """Refuse, at load time, a DoRA adapter on any layer that cannot apply its scale."""
    modules_by_reason: dict[str, list[str]] = {}
    for module_name in sorted(lora.dora_scales):
        layer_name = _owning_layer(manager, module_name)
        layer = manager.modules.get(layer_name) if layer_name else None
        reason = ("no LoRA layer of the served model holds it" if layer is None
                  else dora_unsupported_reason(layer))
        if reason is not None:
            modules_by_reason.setdefault(reason, []).append(module_name)
    if modules_by_reason:
        raise ValueError("cannot serve this DoRA adapter: " + "; ".join(
            f"DoRA is not supported on {reason}: {_summarise(modules)}"
            for reason, modules in modules_by_reason.items()))


def _summarise(modules: list[str], shown: int = 3) -> str:
    more = f" and {len(modules) - shown} more" if len(modules) > shown else ""
    return ", ".join(modules[:shown]) + more


def _owning_layer(manager, module_name: str) -> str | None:
    if module_name in manager.modules:
        return module_name
    for packed_name, sub_modules in manager.packed_modules.items():
        if module_name in sub_modules:
            return packed_name
    return None


def _fetched(held: HeldTrees, lora_id: int, url: str) -> str:
    """vLLM shows a load's ValueError to the client that asked for the load."""
    try:
        return held.fetch(lora_id, url)
    except DoraGatewayError as exc:
        raise ValueError(f"{FETCH_FAILED}: {exc}") from exc


def patch_loading() -> None:
    original_init = WorkerLoRAManager.__init__
    original_load = WorkerLoRAManager._load_adapter
    original_remove = WorkerLoRAManager.remove_adapter
    original_from_local_dir = PEFTHelper.from_local_dir.__func__

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        original_init(self, vllm_config, *args, **kwargs)
        self.dora_base_model = vllm_config.model_config.model
        self.dora_base_revision = vllm_config.model_config.revision
        self.dora_held_trees = HeldTrees()
        self.dora_compiled_cpu = (current_platform.is_cpu() and vllm_config.compilation_config
                                  .mode != CompilationMode.NONE)

    def _load_adapter(self, lora_request: LoRARequest) -> LoRAModel:
        self.dora_held_trees.release_all_but(self.list_adapters())
        path = lora_request.lora_path
        absolute = (_fetched(self.dora_held_trees, lora_request.lora_int_id, path)
                    if is_remote(path) else get_adapter_absolute_path(path))
        served = servable_path(absolute, self.dora_base_model, self.dora_base_revision)
        lora = original_load(self, msgspec.structs.replace(lora_request, lora_path=served))
        mapper = getattr(self._adapter_manager.model, "hf_to_vllm_mapper", None)
        lora.dora_scales = read_scales(served, mapper and mapper.get_rename_mapper())
        if lora.dora_scales:
            check_servable(self._adapter_manager, lora)
        if self.dora_compiled_cpu and (reason := vocab_refusal(self._adapter_manager, lora)):
            raise ValueError(reason)
        return lora

    def remove_adapter(self, adapter_id: int) -> bool:
        removed = original_remove(self, adapter_id)
        self.dora_held_trees.release_all_but(self.list_adapters())
        return removed

    def from_local_dir(cls, lora_path: str, max_position_embeddings: int | None) -> PEFTHelper:
        """A compiled artifact is served as LoRA plus our scale: vLLM's DoRA check passes."""
        helper = original_from_local_dir(cls, lora_path, max_position_embeddings)
        if is_compiled(lora_path):
            helper.use_dora = False
        return helper

    WorkerLoRAManager.__init__ = __init__
    WorkerLoRAManager._load_adapter = _load_adapter
    WorkerLoRAManager.remove_adapter = remove_adapter
    PEFTHelper.from_local_dir = classmethod(from_local_dir)
