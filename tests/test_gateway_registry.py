"""The adapter registry: validation, confinement to roots, all-or-nothing adds, and loading
into (fake) vLLM backends once."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from adapters.base_checkpoint import BaseCheckpoint
from adapters.compile import adapter_content_hash
from adapters.store import CompiledStore
from gateway.errors import (
    AdapterUnavailable,
    BackendUnreachable,
    Conflict,
    InvalidAdapter,
    InvalidRequest,
    ModelNotFound,
    NotFound,
)
from gateway.registry import AdapterRegistry
from gateway.registry.artifacts import LocalArtifacts
from gateway.upstream.pool import BackendPool
from tests.factories import LLAMA_TARGETS, random_adapter
from tests.gateway_fakes import fake_transport, sqlite_registry

pytestmark = pytest.mark.anyio
LOAD = "/v1/load_lora_adapter"
UNLOAD = "/v1/unload_lora_adapter"
ADMIN = "admin:test"


@pytest.fixture
def setup(llama_base, demo, store_dir, tmp_path, vllm):
    adapters_dir = shutil.copytree(demo, tmp_path / "adapters")
    extra_root = tmp_path / "extra"
    extra_root.mkdir()
    pool = BackendPool([vllm.url], httpx.AsyncClient(transport=fake_transport(vllm)))
    registry = AdapterRegistry(BaseCheckpoint(llama_base),
                               LocalArtifacts(CompiledStore(store_dir), tmp_path / "uploads"),
                               [adapters_dir, extra_root], pool, sqlite_registry(tmp_path),
                               uploads=tmp_path / "uploads")
    return registry, pool, adapters_dir, extra_root


async def test_directory_scan_compiles_every_adapter(setup, store_dir):
    registry, _, adapters_dir, _ = setup
    (adapters_dir / "not-an-adapter").mkdir()
    entries = await registry.add_directory(adapters_dir)
    assert [entry.name for entry in entries] == ["caps", "pirate", "plain"]
    caps = registry.get("caps")
    assert caps.is_dora and not registry.get("plain").is_dora
    assert caps.content_hash == adapter_content_hash(adapters_dir / "caps")
    assert caps.internal_name == f"caps--{caps.content_hash[:16]}"
    assert Path(caps.location).parent == store_dir
    assert json.loads((Path(caps.location) / "dora_gateway.json").read_text())["is_dora"]
    assert isinstance(caps.compile_seconds, float) and caps.compile_seconds >= 0
    assert caps.source == str((adapters_dir / "caps").resolve())


async def test_add_from_another_root_and_relative_to_the_adapters_dir(setup):
    registry, _, adapters_dir, extra_root = setup
    shutil.copytree(adapters_dir / "pirate", extra_root / "pirate2")
    assert (await registry.add("pirate2", extra_root / "pirate2", added_by=ADMIN)).is_dora
    caps = await registry.add("caps", "caps", added_by=ADMIN)
    assert caps.source == str((adapters_dir / "caps").resolve())


@pytest.mark.parametrize("name", ["", "-caps", ".hidden", "a/b", "base", "caps\n", "x" * 65,
                                  "caps lora"])
async def test_invalid_names_are_refused(setup, name):
    registry, *_ = setup
    with pytest.raises(InvalidRequest, match="Invalid adapter name"):
        await registry.add(name, "caps", added_by=ADMIN)
    assert registry.entries() == []


async def test_a_taken_name_is_refused(setup):
    registry, *_ = setup
    first = await registry.add("caps", "caps", added_by=ADMIN)
    with pytest.raises(Conflict):
        await registry.add("caps", "pirate", added_by=ADMIN)
    assert registry.entries() == [first]


async def test_paths_outside_the_roots_are_refused_including_symlink_escapes(setup, tmp_path):
    registry, _, adapters_dir, _ = setup
    outside = shutil.copytree(adapters_dir / "caps", tmp_path / "outside")
    os.symlink(outside, adapters_dir / "escape")
    for path in (outside, adapters_dir / "escape", adapters_dir / ".." / "outside", "../outside",
                 "/etc", "caps\0"):
        with pytest.raises(InvalidRequest) as caught:
            await registry.add("sneaky", path, added_by=ADMIN)
        assert caught.value.code == "path_not_allowed"
    assert registry.entries() == []


async def test_a_failed_add_changes_nothing(setup, vllm, store_dir):
    registry, _, adapters_dir, _ = setup
    await registry.add("caps", "caps", added_by=ADMIN)
    broken = adapters_dir / "broken"
    shutil.copytree(adapters_dir / "pirate", broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    name = next(key for key in tensors if key.endswith("lora_B.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    (broken / "extra.bin").write_bytes(b"pickle")
    store_before = sorted(store_dir.iterdir())

    with pytest.raises(InvalidAdapter) as caught:
        await registry.add("broken", broken, added_by=ADMIN)
    assert caught.value.status == 400
    assert any("NaN" in problem for problem in caught.value.problems)
    assert [entry.name for entry in registry.entries()] == ["caps"]
    assert sorted(store_dir.iterdir()) == store_before
    assert vllm.requests == []


async def test_an_adapter_for_another_model_lists_every_problem(setup, tmp_path, gpt2_base):
    registry, _, adapters_dir, _ = setup
    random_adapter(gpt2_base, adapters_dir / "gpt2", r=4, lora_alpha=8,
                   target_modules=["c_attn", "c_proj"], use_dora=True)
    with pytest.raises(InvalidAdapter) as caught:
        await registry.add("gpt2", "gpt2", added_by=ADMIN)
    assert len(caught.value.problems) > 1
    assert registry.get("gpt2") is None


async def test_lazy_load_happens_once_per_backend(setup, vllm):
    registry, pool, *_ = setup
    caps = await registry.add("caps", "caps", added_by=ADMIN)
    (backend,) = pool.backends
    await asyncio.gather(*(registry.ensure_loaded(caps, backend) for _ in range(5)))
    await registry.ensure_loaded(caps, backend)
    assert vllm.received(LOAD) == [{"lora_name": caps.internal_name,
                                    "lora_path": caps.location}]
    assert registry.loaded_on(caps) == [vllm.url]


async def test_a_backend_that_went_down_is_forgotten_and_reloaded(setup, vllm):
    registry, pool, *_ = setup
    caps = await registry.add("caps", "caps", added_by=ADMIN)
    (backend,) = pool.backends
    await registry.ensure_loaded(caps, backend)
    pool.mark_down(backend)
    assert registry.loaded_on(caps) == []
    backend.healthy = True
    vllm.loaded.clear()
    await registry.ensure_loaded(caps, backend)
    assert len(vllm.received(LOAD)) == 2 and caps.internal_name in vllm.loaded


async def test_forgetting_a_backend_that_kept_its_adapters_reloads_harmlessly(setup, vllm):
    registry, pool, *_ = setup
    caps = await registry.add("caps", "caps", added_by=ADMIN)
    (backend,) = pool.backends
    await registry.ensure_loaded(caps, backend)
    registry.forget_backend(backend.url)
    await registry.ensure_loaded(caps, backend)
    assert len(vllm.received(LOAD)) == 2
    assert registry.loaded_on(caps) == [vllm.url]


async def test_a_load_a_healthy_backend_refuses_leaves_the_adapter_unservable(setup, vllm):
    registry, pool, *_ = setup
    caps = await registry.add("caps", "caps", added_by=ADMIN)
    vllm.load_error = "vLLM does not yet support DoRA."
    (backend,) = pool.backends
    for _ in range(2):
        with pytest.raises(AdapterUnavailable, match="does not yet support DoRA") as caught:
            await registry.ensure_loaded(caps, backend)
        assert caught.value.status == 400
    assert len(vllm.received(LOAD)) == 1 and registry.loaded_on(caps) == []
    assert registry.refusal(caps).reason == "vLLM does not yet support DoRA."
    registry.forget_backend(backend.url)  # a restarted backend may accept it
    vllm.load_error = None
    await registry.ensure_loaded(caps, backend)
    assert registry.refusal(caps) is None and registry.loaded_on(caps) == [vllm.url]


async def test_a_load_that_fails_because_the_backend_died_is_not_a_refusal(setup, vllm):
    registry, pool, *_ = setup
    caps = await registry.add("caps", "caps", added_by=ADMIN)
    vllm.dies_on_load = True
    with pytest.raises(BackendUnreachable):
        await registry.ensure_loaded(caps, pool.backends[0])
    assert registry.refusal(caps) is None and not pool.backends[0].healthy


async def test_remove_unloads_and_then_the_name_is_gone(setup, vllm):
    registry, pool, *_ = setup
    caps = await registry.add("caps", "caps", added_by=ADMIN)
    await registry.add("plain", "plain", added_by=ADMIN)
    await registry.ensure_loaded(caps, pool.backends[0])
    await registry.remove("caps", removed_by=ADMIN)
    await registry.remove("plain", removed_by=ADMIN)
    assert vllm.received(UNLOAD) == [{"lora_name": caps.internal_name}]
    assert vllm.loaded == {}
    assert registry.get("caps") is None and registry.entries() == []
    with pytest.raises(NotFound):
        await registry.remove("caps", removed_by=ADMIN)
    with pytest.raises(ModelNotFound):
        await registry.ensure_loaded(caps, pool.backends[0])
    assert len(vllm.received(LOAD)) == 1


async def test_a_replaced_adapter_gets_a_new_internal_name(setup, llama_base):
    registry, _, adapters_dir, _ = setup
    first = await registry.add("caps", "caps", added_by=ADMIN)
    await registry.remove("caps", removed_by=ADMIN)
    random_adapter(llama_base, adapters_dir / "caps-v2", seed=42, r=4, lora_alpha=8,
                   target_modules=LLAMA_TARGETS, use_dora=True)
    second = await registry.add("caps", "caps-v2", added_by=ADMIN)
    assert second.internal_name != first.internal_name
    assert second.internal_name.startswith("caps--")


async def test_load_all_loads_every_adapter(setup, vllm):
    registry, pool, adapters_dir, _ = setup
    entries = await registry.add_directory(adapters_dir)
    await registry.load_all(pool.backends[0])
    assert set(vllm.loaded) == {entry.internal_name for entry in entries}
