"""The admin API: listing, adding from a path or an upload, removing; all-or-nothing."""

from __future__ import annotations

import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.gateway_fakes import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    FakeVllm,
    make_gateway,
)

pytestmark = pytest.mark.anyio
ADAPTERS = "/admin/adapters"
CHAT = "/v1/chat/completions"
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture
async def gateway(tmp_path, llama_base, demo, store_dir):
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, FakeVllm())
    yield gateway
    await gateway.pool.aclose()


def names(gateway) -> list[str]:
    return [entry.name for entry in gateway.registry.entries()]


async def chat(gateway, model: str, key: str = GLOBEX_KEY):
    async with gateway.client(key) as client:
        return await client.post(CHAT, json={"model": model, "messages": []})


def upload_files(directory, **overrides) -> list:
    files = [(name, (name, (directory / name).read_bytes())) for name in FILES]
    return [*files, *overrides.items()]


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("key", [None, ACME_KEY, "sk-wrong-0123456789abcdef"])
async def test_admin_routes_need_an_admin_key(gateway, key, demo):
    before = names(gateway)
    async with gateway.client(key) as client:
        responses = [
            await client.get(ADAPTERS),
            await client.post(ADAPTERS, json={"name": "x", "path": "caps"}),
            await client.post(ADAPTERS, content=b"not json"),
            await client.post(f"{ADAPTERS}/x/upload", files=upload_files(demo / "caps")),
            await client.delete(f"{ADAPTERS}/caps"),
        ]
    for response in responses:
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert names(gateway) == before
    assert not gateway.registry.uploads.exists()


async def test_list_shows_each_adapter_and_where_it_is_loaded(gateway):
    assert (await chat(gateway, "caps")).status_code == 200
    async with gateway.client(ADMIN_KEY) as client:
        listed = (await client.get(ADAPTERS)).json()["data"]
    assert [item["name"] for item in listed] == ["caps", "pirate", "plain"]
    caps, _, plain = listed
    entry = gateway.registry.get("caps")
    assert caps["is_dora"] and not plain["is_dora"]
    assert caps["hash"] == entry.content_hash
    assert caps["internal_name"] == entry.internal_name
    assert caps["loaded_backends"] == [gateway.vllm.url] and plain["loaded_backends"] == []


async def test_add_from_a_path_under_a_root(gateway, demo):
    root = gateway.config.adapters.roots[1]
    shutil.copytree(demo / "pirate", root / "pirate-v2")
    async with gateway.client(ADMIN_KEY) as client:
        response = await client.post(ADAPTERS, json={"name": "pirate2",
                                                     "path": str(root / "pirate-v2")})
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "pirate2" and response.json()["is_dora"]
    answer = await chat(gateway, "pirate2")
    assert answer.status_code == 200 and answer.json()["model"] == "pirate2"
    assert (await chat(gateway, "pirate2", ACME_KEY)).status_code == 404


async def test_add_outside_the_roots_is_refused(gateway, demo, tmp_path):
    outside = shutil.copytree(demo / "caps", tmp_path / "outside")
    os.symlink(outside, gateway.config.adapters.dir / "link")
    async with gateway.client(ADMIN_KEY) as client:
        for path in (str(outside), "link", "../outside"):
            response = await client.post(ADAPTERS, json={"name": "sneaky", "path": path})
            assert assert_error(response, 400, "path_not_allowed")["param"] == "path"
    assert "sneaky" not in names(gateway)


async def test_a_failed_add_leaves_everything_as_it_was(gateway):
    broken = gateway.config.adapters.dir / "broken"
    shutil.copytree(gateway.config.adapters.dir / "caps", broken)
    (broken / "adapter_model.safetensors").unlink()
    (broken / "adapter_model.bin").write_bytes(b"pickle")
    before = names(gateway)
    async with gateway.client(ADMIN_KEY) as client:
        response = await client.post(ADAPTERS, json={"name": "broken", "path": "broken"})
    error = assert_error(response, 400, "invalid_adapter")
    assert "missing adapter_model.safetensors" in error["problems"]
    assert any("pickle" in problem for problem in error["problems"])
    assert names(gateway) == before
    assert gateway.vllm.requests == []


@pytest.mark.parametrize(("content", "code"), [
    (b'{"name": "x"}', "invalid_request"),
    (b'{"name": "x", "path": "p", "y": 1}', "invalid_request"),
    (b'{"name": 1, "path": "caps"}', "invalid_request"), (b"[]", "invalid_request"),
    (b"{oops", "invalid_json")])
async def test_add_validation_errors_are_400_in_openai_shape(gateway, content, code):
    async with gateway.client(ADMIN_KEY) as client:
        response = await client.post(ADAPTERS, content=content,
                                     headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, code)
    assert set(error) == {"message", "type", "param", "code"}


async def test_add_a_taken_name_is_409(gateway):
    async with gateway.client(ADMIN_KEY) as client:
        response = await client.post(ADAPTERS, json={"name": "caps", "path": "pirate"})
    assert_error(response, 409, "adapter_exists")


async def test_upload_stores_atomically_by_content_and_serves(gateway, demo):
    async with gateway.client(ADMIN_KEY) as client:
        response = await client.post(f"{ADAPTERS}/uploaded/upload",
                                     files=upload_files(demo / "pirate"))
        again = await client.post(f"{ADAPTERS}/again/upload", files=upload_files(demo / "pirate"))
    assert response.status_code == 201, response.text
    assert again.status_code == 201, again.text
    content_hash = gateway.registry.get("pirate").content_hash
    assert response.json()["hash"] == content_hash
    assert response.json()["origin"] == "upload"
    assert response.json()["added_by"].startswith("admin:")
    uploads = gateway.registry.uploads
    stored = uploads / content_hash
    assert response.json()["source"] == again.json()["source"] == str(stored)
    for name in FILES:
        assert (stored / name).read_bytes() == (demo / "pirate" / name).read_bytes()
    assert sorted(path.name for path in stored.iterdir()) == sorted(FILES)
    assert [path.name for path in uploads.iterdir()] == [content_hash]
    assert (await chat(gateway, "uploaded")).json()["model"] == "uploaded"


@pytest.mark.parametrize(("extra", "drop", "message"), [
    ({"adapter_model.bin": ("adapter_model.bin", b"pickle")}, None, "'adapter_model.bin'"),
    ({"../adapter_config.json": ("x", b"{}")}, None, "'../adapter_config.json'"),
    ({}, "adapter_model.safetensors", "Missing file(s): adapter_model.safetensors"),
    ({"notes": (None, b"text field")}, None, "Unexpected form field 'notes'"),
])
async def test_uploads_of_anything_else_are_refused(gateway, demo, extra, drop, message):
    files = [item for item in upload_files(demo / "caps", **extra) if item[0] != drop]
    async with gateway.client(ADMIN_KEY) as client:
        response = await client.post(f"{ADAPTERS}/other/upload", files=files)
    assert message in assert_error(response, 400, "invalid_upload")["message"]
    assert "other" not in names(gateway)
    assert not gateway.registry.uploads.exists() or not list(gateway.registry.uploads.iterdir())


async def test_an_invalid_upload_leaves_no_files(gateway, demo, tmp_path):
    bad = shutil.copytree(demo / "caps", tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] * float("inf")
    save_file(tensors, bad / "adapter_model.safetensors")
    async with gateway.client(ADMIN_KEY) as client:
        response = await client.post(f"{ADAPTERS}/bad/upload", files=upload_files(bad))
    error = assert_error(response, 400, "invalid_adapter")
    assert any("NaN or Inf" in problem for problem in error["problems"])
    assert list(gateway.registry.uploads.iterdir()) == []
    assert "bad" not in names(gateway) and gateway.vllm.requests == []


async def test_upload_name_rules(gateway, demo):
    async with gateway.client(ADMIN_KEY) as client:
        taken = await client.post(f"{ADAPTERS}/caps/upload", files=upload_files(demo / "caps"))
        invalid = await client.post(f"{ADAPTERS}/-x/upload", files=upload_files(demo / "caps"))
    assert_error(taken, 409, "adapter_exists")
    assert_error(invalid, 400, "invalid_adapter_name")


async def test_delete_unloads_and_later_requests_404(gateway):
    assert (await chat(gateway, "caps")).status_code == 200
    internal = gateway.registry.get("caps").internal_name
    async with gateway.client(ADMIN_KEY) as client:
        deleted = await client.delete(f"{ADAPTERS}/caps")
        again = await client.delete(f"{ADAPTERS}/caps")
    assert deleted.status_code == 204 and deleted.content == b""
    assert gateway.vllm.received("/v1/unload_lora_adapter") == [{"lora_name": internal}]
    assert internal not in gateway.vllm.loaded
    assert_error(again, 404, "adapter_not_found")
    missing = await chat(gateway, "caps")
    assert_error(missing, 404, "model_not_found")
    async with gateway.client(GLOBEX_KEY) as client:
        listed = (await client.get("/v1/models")).json()["data"]
    assert "caps" not in [model["id"] for model in listed]


async def test_health_needs_no_key(gateway):
    async with gateway.client() as client:
        response = await client.get("/health")
    assert response.status_code == 200 and response.json() == {
        "status": "ok", "limits": {"store": "memory", "reachable": True, "fail": "open"}}
