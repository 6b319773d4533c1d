"""The gateway on an S3 store (a real moto server on loopback), in front of a fake vLLM:
artifacts are published and vLLM is given their URLs, adapters added from `s3://` are kept
by content hash with what they resolved to, and every failure is one clear 400 or 502 that
leaves the registry as it was. (`test_object_storage.py` runs the same against real vLLMs.)
"""

from __future__ import annotations

import os
import subprocess

import pytest

from adapters.compile import adapter_content_hash
from adapters.object_store import fetch_tree
from adapters.plugin_env import FETCH_FAILED
from adapters.store import CompiledStore
from adapters.tree_cache import TreeCache
from gateway.registry.artifacts import S3Artifacts
from tests.gateway_fakes import ADMIN_KEY, GLOBEX_KEY, FakeVllm, make_gateway
from tests.gateway_process import GATEWAY_CLI, write_config
from tests.hub_cache import cache_repo
from tests.s3_server import S3Server, new_bucket_name, use_server_env

pytestmark = pytest.mark.anyio
ADAPTERS = "/admin/adapters"
FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_SOURCE_BYTES = 200_000


async def s3_gateway(tmp_path, llama_base, demo, store_dir, server: S3Server):
    """A gateway whose store is a fresh bucket of `server` (the process's AWS_* point there)."""
    store = f"s3://{server.create_bucket(new_bucket_name())}/store"
    artifacts = S3Artifacts(store, CompiledStore(tmp_path / "compiled"),
                            TreeCache(tmp_path / "cache", 1 << 30))
    gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, FakeVllm(),
                                 artifacts=artifacts,
                                 adapters=f"max_upload_bytes = {MAX_SOURCE_BYTES}")
    gateway.store = store
    return gateway


@pytest.fixture
async def gateway(tmp_path, llama_base, demo, store_dir, s3_env):
    gateway = await s3_gateway(tmp_path, llama_base, demo, store_dir, s3_env)
    yield gateway
    await gateway.pool.aclose()


@pytest.fixture
def user_bucket(s3_env) -> str:
    return s3_env.create_bucket(new_bucket_name(), versioned=True)


def put_adapter(server: S3Server, bucket: str, prefix: str, adapter) -> str:
    client = server.client()
    for file in FILES:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{file}",
                          Body=(adapter / file).read_bytes())
    return f"s3://{bucket}/{prefix}/"


async def add(gateway, body: dict):
    async with gateway.client(ADMIN_KEY) as client:
        return await client.post(ADAPTERS, json=body)


async def chat(gateway, model: str):
    async with gateway.client(GLOBEX_KEY) as client:
        return await client.post("/v1/chat/completions",
                                 json={"model": model, "messages": []})


def names(gateway) -> set[str]:
    return {entry.name for entry in gateway.registry.entries()}


async def test_vllm_is_given_the_published_artifact_url_holding_the_compiled_files(
        gateway, tmp_path):
    assert (await chat(gateway, "caps")).status_code == 200
    entry = gateway.registry.get("caps")
    assert entry.location == f"{gateway.store}/compiled/{entry.artifact}"
    assert gateway.vllm.loaded[entry.internal_name] == entry.location
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    fetch_tree(entry.location, fetched)
    local = tmp_path / "compiled" / entry.artifact
    assert sorted(path.name for path in fetched.iterdir()) == sorted(
        path.name for path in local.iterdir())
    for path in local.iterdir():
        assert (fetched / path.name).read_bytes() == path.read_bytes()


async def test_an_s3_source_is_kept_by_content_hash_with_the_versions_it_resolved_to(
        gateway, s3_env, user_bucket, demo, tmp_path):
    source = put_adapter(s3_env, user_bucket, "team/caps", demo / "caps")
    response = await add(gateway, {"name": "caps-copy", "source": source})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["origin"] == "url"
    assert body["source"] == f"{gateway.store}/adapters/{adapter_content_hash(demo / 'caps')}"
    client = s3_env.client()
    for file in FILES:
        head = client.head_object(Bucket=user_bucket, Key=f"team/caps/{file}")
        assert body["fetched_from"]["objects"][file] == {"etag": head["ETag"],
                                                         "version_id": head["VersionId"]}
    # The user's bucket changes; the kept copy is still the bytes that were added.
    put_adapter(s3_env, user_bucket, "team/caps", demo / "pirate")
    kept = tmp_path / "kept"
    kept.mkdir()
    fetch_tree(body["source"], kept)
    for file in FILES:
        assert (kept / file).read_bytes() == (demo / "caps" / file).read_bytes()
    assert (await chat(gateway, "caps-copy")).status_code == 200


async def test_an_upload_is_kept_in_the_store(gateway, demo):
    async with gateway.client(ADMIN_KEY) as client:
        response = await client.post(f"{ADAPTERS}/up/upload", files=[
            (file, (file, (demo / "pirate" / file).read_bytes())) for file in FILES])
    assert response.status_code == 201, response.text
    expected = f"{gateway.store}/adapters/{adapter_content_hash(demo / 'pirate')}"
    assert response.json()["source"] == expected


@pytest.mark.parametrize(("body", "status", "code", "names_it"), [
    ({"source": "s3://{bucket}/nothing-here/"}, 400, "source_not_found",
     "s3://{bucket}/nothing-here/adapter_config.json"),
    ({"source": "ftp://example.com/adapter"}, 400, "source_invalid", "ftp://example.com/adapter"),
    ({"source": "s3:///no-bucket"}, 400, "source_invalid", "s3:///no-bucket"),
    ({"source": "hf://not a repo"}, 400, "source_invalid", "hf://not a repo"),
    ({"source": "s3://{bucket}/big/"}, 400, "source_too_large", "s3://{bucket}/big/"),
    ({"source": "s3://{bucket}/team/caps/", "path": "caps"}, 400, "invalid_request", "exactly"),
    ({}, 400, "invalid_request", "exactly"),
])
async def test_a_bad_source_is_one_clear_400_and_nothing_changes(
        gateway, s3_env, user_bucket, demo, body, status, code, names_it):
    put_adapter(s3_env, user_bucket, "team/caps", demo / "caps")
    s3_env.client().put_object(Bucket=user_bucket, Key="big/adapter_config.json",
                               Body=b"{" + b" " * MAX_SOURCE_BYTES + b"}")
    before = names(gateway)
    body = {"name": "new", **{key: value.format(bucket=user_bucket)
                              for key, value in body.items()}}
    response = await add(gateway, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and names_it.format(bucket=user_bucket) in error["message"]
    assert names(gateway) == before


async def test_a_source_that_is_not_a_peft_adapter_lists_its_problems(
        gateway, s3_env, user_bucket):
    client = s3_env.client()
    client.put_object(Bucket=user_bucket, Key="junk/adapter_config.json", Body=b"{}")
    client.put_object(Bucket=user_bucket, Key="junk/adapter_model.safetensors", Body=b"junk")
    response = await add(gateway, {"name": "junk", "source": f"s3://{user_bucket}/junk/"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_adapter"
    assert "junk" not in names(gateway)


async def test_a_taken_name_is_409_before_anything_is_fetched(gateway):
    response = await add(gateway, {"name": "caps", "source": "s3://no-such-bucket/x/"})
    assert response.status_code == 409, response.text


async def test_a_source_the_credentials_may_not_read_is_a_502_that_names_it(
        tmp_path, llama_base, demo, store_dir, s3_server, monkeypatch):
    """The gateway's key may use its store but not the user's bucket: a real AccessDenied."""
    store_bucket = s3_server.create_bucket(new_bucket_name())
    user_bucket = s3_server.create_bucket(new_bucket_name())
    put_adapter(s3_server, user_bucket, "caps", demo / "caps")
    env = s3_server.create_user([{"Effect": "Allow", "Action": "s3:*", "Resource": [
        f"arn:aws:s3:::{store_bucket}", f"arn:aws:s3:::{store_bucket}/*"]}])
    use_server_env(env, monkeypatch)
    with s3_server.enforcing_auth():
        artifacts = S3Artifacts(f"s3://{store_bucket}/store", CompiledStore(tmp_path / "c"),
                                TreeCache(tmp_path / "cache", 1 << 30))
        gateway = await make_gateway(tmp_path, llama_base, demo, store_dir, FakeVllm(),
                                     artifacts=artifacts)
        try:
            response = await add(gateway, {"name": "new", "source": f"s3://{user_bucket}/caps/"})
        finally:
            await gateway.pool.aclose()
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "store_denied"
    assert f"s3://{user_bucket}/caps/adapter_config.json" in error["message"]
    assert "new" not in names(gateway)


async def test_a_store_that_is_down_fails_adds_with_502_and_loaded_adapters_keep_serving(
        tmp_path, llama_base, demo, store_dir, monkeypatch):
    server = S3Server()
    server.start()
    try:
        use_server_env(server.env(), monkeypatch)
        gateway = await s3_gateway(tmp_path, llama_base, demo, store_dir, server)
        assert (await chat(gateway, "caps")).status_code == 200
    finally:
        server.stop()
    try:
        response = await add(gateway, {"name": "new", "source": f"{gateway.store}/x/"})
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == "store_unavailable"
        async with gateway.client(ADMIN_KEY) as client:
            uploaded = await client.post(f"{ADAPTERS}/up/upload", files=[
                (file, (file, (demo / "pirate" / file).read_bytes())) for file in FILES])
        assert uploaded.status_code == 502, uploaded.text
        assert uploaded.json()["error"]["code"] == "store_unavailable"
        assert (await chat(gateway, "caps")).status_code == 200
        assert not {"new", "up"} & names(gateway)
    finally:
        await gateway.pool.aclose()


async def test_a_backend_that_could_not_fetch_is_a_502_and_not_a_refusal(gateway):
    gateway.vllm.load_error = f"{FETCH_FAILED}: {gateway.store}/blobs/x: the store is down"
    response = await chat(gateway, "caps")
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "store_error"
    assert gateway.registry.refusal(gateway.registry.get("caps")) is None
    gateway.vllm.load_error = None
    assert (await chat(gateway, "caps")).status_code == 200


def serve_with_store(tmp_path, llama_base, server: S3Server, bucket: str,
                     credentials: tuple[str, str]) -> subprocess.CompletedProcess:
    """`dora-gateway serve` with `s3://BUCKET/store`, run until it exits."""
    adapters_dir = tmp_path / "adapters"
    adapters_dir.mkdir()
    config = write_config(tmp_path / "gateway.toml", model=llama_base, adapters_dir=adapters_dir,
                          roots=[], backends=["http://127.0.0.1:9"],
                          store_url=f"s3://{bucket}/store")
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(server.env(*credentials), DORA_GATEWAY_HOME=str(tmp_path / "home"))
    return subprocess.run([GATEWAY_CLI, "serve", "--config", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_wrong_credentials_stop_the_start_with_the_reason(tmp_path, llama_base, s3_server):
    bucket = s3_server.create_bucket(new_bucket_name())
    with s3_server.enforcing_auth():
        result = serve_with_store(tmp_path, llama_base, s3_server, bucket,
                                  ("AKIAWRONGWRONGWRONG", "wrong-secret"))
    assert result.returncode != 0
    assert f"[store] url s3://{bucket}/store" in result.stderr, result.stderr
    assert "access denied" in result.stderr, result.stderr


def test_a_missing_bucket_stops_the_start_with_the_reason(tmp_path, llama_base, s3_server):
    bucket = new_bucket_name()
    result = serve_with_store(tmp_path, llama_base, s3_server, bucket, ("testing", "testing"))
    assert result.returncode != 0
    assert f"[store] url s3://{bucket}/store: no such object or bucket" in result.stderr, \
        result.stderr


async def test_an_hf_source_is_read_from_the_hub_cache_and_pins_its_commit(
        gateway, hub_cache, demo):
    commit = "c0ffee" + "0" * 34
    cache_repo(hub_cache, "acme/styles", {f"caps/{file}": demo / "caps" / file
                                          for file in FILES}, commit)
    response = await add(gateway, {"name": "hub-caps", "source": "hf://acme/styles/caps"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["fetched_from"] == {"url": "hf://acme/styles/caps", "commit": commit}
    assert body["hash"] == adapter_content_hash(demo / "caps")
    assert body["source"] == f"{gateway.store}/adapters/{body['hash']}"
    missing = await add(gateway, {"name": "hub-x", "source": "hf://acme/nothing/caps"})
    assert missing.status_code == 502, missing.text
    assert missing.json()["error"]["code"] == "store_unavailable"
    assert "hf://acme/nothing/caps" in missing.json()["error"]["message"]
