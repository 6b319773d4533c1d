"""Start-up and backend health over time: eager loading, a backend going down and coming back."""

from __future__ import annotations

import pytest

from gateway.upstream.health_checks import refresh
from tests.gateway_fakes import ADMIN_KEY, GLOBEX_KEY, FakeVllm, make_gateway

pytestmark = pytest.mark.anyio
LOAD = "/v1/load_lora_adapter"


def internal_names(gateway) -> set[str]:
    return {entry.internal_name for entry in gateway.registry.entries()}


async def test_eager_loading_at_start_and_after_a_backend_comes_back(tmp_path, llama_base, demo,
                                                                    store_dir):
    up, down = FakeVllm("http://vllm-a:8000"), FakeVllm("http://vllm-b:8000", down=True)
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, up, down, eager=True)
    async with gateway.app.router.lifespan_context(gateway.app):
        assert set(up.loaded) == internal_names(gateway)
        assert [backend.healthy for backend in gateway.pool.backends] == [True, False]
        down.down = False
        await refresh(gateway.pool, gateway.registry, eager=True)
        assert set(down.loaded) == internal_names(gateway)
        up.down = True
        await refresh(gateway.pool, gateway.registry, eager=True)
        up.down = False
        up.loaded.clear()
        await refresh(gateway.pool, gateway.registry, eager=True)
        assert set(up.loaded) == internal_names(gateway)
    await gateway.pool.aclose()


async def test_lazy_gateway_loads_nothing_at_start(tmp_path, llama_base, demo, store_dir):
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir)
    async with gateway.app.router.lifespan_context(gateway.app):
        assert gateway.vllm.received(LOAD) == []
        assert gateway.pool.any_healthy
    await gateway.pool.aclose()


async def test_eager_add_that_the_backend_refuses_changes_nothing(tmp_path, llama_base, demo,
                                                                  store_dir):
    first, second = FakeVllm("http://vllm-a:8000"), FakeVllm("http://vllm-b:8000")
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, first, second,
                                 eager=True)
    second.load_error = "DoRA is not supported on this layer"
    async with gateway.client(ADMIN_KEY) as client:
        refused = await client.post("/admin/adapters", json={"name": "caps2", "path": "caps"})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "adapter_unavailable"
        assert "DoRA is not supported on this layer" in refused.json()["error"]["message"]
        assert gateway.registry.get("caps2") is None
        assert first.loaded == {} and second.loaded == {}
        assert len(first.received("/v1/unload_lora_adapter")) == 1
        second.load_error = None
        added = await client.post("/admin/adapters", json={"name": "plain2", "path": "plain"})
    assert added.status_code == 201
    assert added.json()["loaded_backends"] == [first.url, second.url]
    async with gateway.client(GLOBEX_KEY) as client:
        assert (await client.post("/v1/completions", json={"model": "plain2", "prompt": "x"})
                ).json()["model"] == "plain2"
    await gateway.pool.aclose()
