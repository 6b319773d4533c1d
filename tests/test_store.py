"""The content-addressed store of compiled adapters: cache hits, keys, atomic writes."""

from __future__ import annotations

import pytest
import torch

import adapters.store
from adapters.base_checkpoint import BaseCheckpoint
from adapters.compile import compile_directory
from adapters.compiled import read_compiled
from adapters.errors import AdapterError
from adapters.store import CompiledStore
from tests.factories import LLAMA_TARGETS, random_adapter, tiny_llama


@pytest.fixture
def adapter(llama_base, tmp_path):
    return random_adapter(llama_base, tmp_path / "adapter", r=4, lora_alpha=8,
                          target_modules=LLAMA_TARGETS, use_dora=True)


def test_second_compile_is_a_cache_hit_with_identical_content(adapter, llama_base, tmp_path):
    store = CompiledStore(tmp_path / "store")
    first = store.compile(adapter, BaseCheckpoint(llama_base))
    second = store.compile(adapter, BaseCheckpoint(llama_base))
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert first.path == second.path

    stored = read_compiled(first.path)
    direct = compile_directory(adapter, BaseCheckpoint(llama_base))
    assert stored.metadata["adapter_hash"] == first.adapter_hash
    assert stored.peft_config["use_dora"] is True
    for name, layer in direct.modules.items():
        assert torch.equal(stored.modules[name].fused_b, layer.fused_b)
        assert torch.equal(stored.modules[name].scale, layer.scale)


def test_changed_adapter_or_base_gets_a_new_entry(adapter, llama_base, tmp_path):
    store = CompiledStore(tmp_path / "store")
    original = store.compile(adapter, BaseCheckpoint(llama_base)).path
    other_base = tiny_llama(tmp_path / "other-base", seed=5)
    on_other_base = store.compile(adapter, BaseCheckpoint(other_base))
    retrained = random_adapter(llama_base, tmp_path / "retrained", seed=9, r=4, lora_alpha=8,
                               target_modules=LLAMA_TARGETS, use_dora=True)
    changed = store.compile(retrained, BaseCheckpoint(llama_base))
    assert len({original, on_other_base.path, changed.path}) == 3
    assert not on_other_base.cache_hit and not changed.cache_hit


def test_failed_write_leaves_no_entry(adapter, llama_base, tmp_path, monkeypatch):
    def crash(compiled, directory):
        (directory / "partial").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(adapters.store, "write_compiled", crash)
    store = CompiledStore(tmp_path / "store")
    with pytest.raises(OSError, match="disk full"):
        store.compile(adapter, BaseCheckpoint(llama_base))
    assert list((tmp_path / "store").iterdir()) == []


def test_invalid_adapter_compiles_nothing(adapter, llama_base, tmp_path):
    (adapter / "adapter_config.json").write_text("{not json")
    store = CompiledStore(tmp_path / "store")
    with pytest.raises(AdapterError, match="not valid JSON"):
        store.compile(adapter, BaseCheckpoint(llama_base))
    assert not (tmp_path / "store").exists()
