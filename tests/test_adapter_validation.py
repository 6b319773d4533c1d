"""Every way an adapter is refused, each listed in one `AdapterError`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.base_checkpoint import BaseCheckpoint
from adapters.base_fit import check_fits
from adapters.errors import AdapterError
from adapters.peft_adapter import read_adapter
from tests.factories import LLAMA_TARGETS, random_adapter, tiny_llama

Q_KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def adapter(llama_base: Path, tmp_path: Path) -> Path:
    return random_adapter(llama_base, tmp_path / "adapter", r=4, lora_alpha=8,
                          target_modules=LLAMA_TARGETS, use_dora=True)


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(adapter: Path, edit) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def problems_of(adapter: Path, base: Path | None = None) -> list[str]:
    with pytest.raises(AdapterError) as caught:
        parsed = read_adapter(adapter)
        if base is not None:
            check_fits(parsed, BaseCheckpoint(base))
    return caught.value.problems


def test_valid_adapter_reads_both_magnitude_spellings(adapter: Path):
    parsed = read_adapter(adapter)
    assert parsed.is_dora and len(parsed.modules) == 2 * len(LLAMA_TARGETS)

    def rename_magnitudes(tensors: dict) -> None:
        for key in [k for k in tensors if k.endswith("lora_magnitude_vector")]:
            tensors[key + ".weight"] = tensors.pop(key)

    edit_tensors(adapter, rename_magnitudes)
    reread = read_adapter(adapter)
    assert all(m.magnitude is not None for m in reread.modules.values())
    for name, module in parsed.modules.items():
        assert torch.equal(module.magnitude, reread.modules[name].magnitude)


def test_missing_files(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    problems = problems_of(tmp_path / "empty")
    assert any("missing adapter_config.json" in p for p in problems)
    assert any("missing adapter_model.safetensors" in p for p in problems)
    assert "is not a directory" in problems_of(tmp_path / "nowhere")[0]


def test_pickle_weights_are_refused(adapter: Path):
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    problems = problems_of(adapter)
    assert any("pickle-based weights are refused (adapter_model.bin)" in p for p in problems)


def test_weights_linked_from_outside_are_refused(adapter: Path, tmp_path: Path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(adapter / "adapter_model.safetensors", outside)
    (adapter / "adapter_model.safetensors").symlink_to(outside)
    assert any("links outside the adapter directory" in p for p in problems_of(adapter))


def test_nan_and_inf_are_refused(adapter: Path):
    def poison(tensors: dict) -> None:
        tensors[f"{Q_KEY}.lora_A.weight"][0, 0] = float("nan")
        tensors[f"{Q_KEY}.lora_B.weight"][0, 0] = float("inf")

    edit_tensors(adapter, poison)
    problems = problems_of(adapter)
    assert f"{Q_KEY}.lora_A.weight: contains NaN or Inf" in problems
    assert f"{Q_KEY}.lora_B.weight: contains NaN or Inf" in problems


def test_missing_and_extra_tensors(adapter: Path):
    def damage(tensors: dict) -> None:
        del tensors[f"{Q_KEY}.lora_B.weight"]
        del tensors[f"{Q_KEY.replace('q_proj', 'k_proj')}.lora_magnitude_vector"]
        tensors["base_model.model.model.layers.0.mlp.gate_proj.extra"] = torch.zeros(2)
        tensors["base_model.model.model.layers.0.norm.lora_A.weight"] = torch.zeros(4, 64)
        tensors["base_model.model.model.layers.0.norm.lora_B.weight"] = torch.zeros(64, 4)

    edit_tensors(adapter, damage)
    problems = problems_of(adapter)
    assert "model.layers.0.self_attn.q_proj: missing lora_B" in problems
    assert any("k_proj: missing lora_magnitude_vector" in p for p in problems)
    assert any("unexpected tensor 'base_model.model.model.layers.0.mlp.gate_proj.extra'" in p
               for p in problems)
    assert any("model.layers.0.norm: not selected by target_modules" in p for p in problems)


def test_shapes_against_config_and_base(adapter: Path, llama_base: Path, tmp_path: Path):
    def reshape(tensors: dict) -> None:
        tensors[f"{Q_KEY}.lora_A.weight"] = torch.zeros(3, 64)
        tensors[f"{Q_KEY.replace('q_proj', 'v_proj')}.lora_magnitude_vector"] = torch.ones(7)

    edit_tensors(adapter, reshape)
    problems = problems_of(adapter)
    assert any("q_proj: lora_A has shape (3, 64), expected [4, in]" in p for p in problems)
    assert any("v_proj: magnitude has shape (7,)" in p for p in problems)

    other_base = tiny_llama(tmp_path / "wider", hidden_size=96)
    good = random_adapter(llama_base, tmp_path / "good", r=4, lora_alpha=8,
                          target_modules=LLAMA_TARGETS, use_dora=True)
    problems = problems_of(good, base=other_base)
    assert "does not match base model" in problems[0]
    assert any("lora_A takes 64 inputs, the base layer has 96" in p for p in problems)


def test_module_missing_from_base(adapter: Path, tmp_path: Path):
    def rename(tensors: dict) -> None:
        for key in [k for k in tensors if ".layers.1." in k]:
            tensors[key.replace(".layers.1.", ".layers.7.")] = tensors.pop(key)

    edit_tensors(adapter, rename)
    base = tiny_llama(tmp_path / "base")
    problems = problems_of(adapter, base=base)
    assert any("the base model has no tensor 'model.layers.7.self_attn.q_proj.weight'" in p
               for p in problems)


@pytest.mark.parametrize(("changes", "expected"), [
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save is not supported"),
    ({"lora_bias": True}, "lora_bias is not supported"),
    ({"r": 0}, "'r' must be a positive integer"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices is not supported"),
])
def test_unsupported_config_features(adapter: Path, changes: dict, expected: str):
    edit_config(adapter, **changes)
    assert any(expected in p for p in problems_of(adapter))


def test_dora_on_embeddings_and_lm_head_is_refused(llama_base: Path, tmp_path: Path):
    adapter = random_adapter(llama_base, tmp_path / "a", r=4, lora_alpha=8,
                             target_modules=["q_proj", "lm_head"], use_dora=True)
    assert "lm_head: DoRA on embeddings or lm_head is not supported" in " ".join(
        problems_of(adapter))
    embedding = random_adapter(llama_base, tmp_path / "e", r=4, lora_alpha=8,
                               target_modules=["embed_tokens"], use_dora=False)
    assert any("lora_embedding_A" in p for p in problems_of(embedding))


def test_every_problem_is_listed_at_once(adapter: Path):
    edit_config(adapter, modules_to_save=["lm_head"], lora_bias=True)

    def poison(tensors: dict) -> None:
        tensors[f"{Q_KEY}.lora_A.weight"][0, 0] = float("inf")

    edit_tensors(adapter, poison)
    with pytest.raises(AdapterError) as caught:
        read_adapter(adapter)
    message = str(caught.value)
    for fragment in ("modules_to_save", "lora_bias", "contains NaN or Inf"):
        assert fragment in message
