"""No shared directory: two real gateways and two real vLLM replicas, each with a
`$DORA_GATEWAY_HOME` of its own, over a real S3-compatible server (moto's, on loopback) and
one real PostgreSQL registry.

Every process reaches the S3 server through a TCP relay the tests cut, so the store goes down
while the processes keep running. Replica 2 is a stock `vllm serve` given the base model as a
Hugging Face Hub id, served from an offline Hub cache.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.engine.process import EngineProcess, EngineSettings
from tests.conftest import TEST_OUTPUT
from tests.engine import LOGPROB_TOLERANCE, complete, load_adapter, max_logprob_gap
from tests.gateway_process import ADMIN_KEY, GLOBEX_KEY, PROMPT, GatewayProcess, write_config
from tests.hub_cache import cache_repo
from tests.postgres_server import PostgresServer, TcpRelay
from tests.s3_server import S3Server

pytestmark = pytest.mark.vllm
ADAPTERS = "/admin/adapters"
FILES = ("adapter_config.json", "adapter_model.safetensors")
STORE = "s3://dora/store"
USER_ADAPTERS = "s3://user/adapters"
BASE_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTER_REPO = "demo-org/dora-adapters"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONVERGE_S = 120


@dataclass
class Cluster:
    """Everything the tests run against; `start` (re)starts it with fresh homes."""

    s3: S3Server
    relay: TcpRelay
    registry_url: str
    default_model: Path
    demo: Path
    directory: Path
    hub_cache: Path
    replicas: list[EngineProcess] = field(default_factory=list)
    gateways: dict[str, GatewayProcess] = field(default_factory=dict)
    generation: int = 0

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        """A process's environment: its own home, the store through the relay."""
        store = {**self.s3.env(), "AWS_ENDPOINT_URL_S3": self.relay_endpoint,
                 "AWS_ENDPOINT_URL": self.relay_endpoint}
        return {**os.environ, **store, "DORA_GATEWAY_HOME": str(home), **extra}

    @property
    def relay_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.relay.port}"

    def fresh_home(self, name: str) -> Path:
        self.generation += 1
        home = self.directory / f"{name}-{self.generation}"
        home.mkdir(parents=True)
        return home

    def start(self) -> None:
        """Replicas and gateways together (a gateway is healthy once one replica is), each
        with a fresh home; returns once all are up."""
        self._launch_replicas()
        self.start_gateways()
        for replica in self.replicas:
            replica.wait_ready()
        for name, gateway in self.gateways.items():
            eventually(lambda gateway=gateway: backends_up(gateway) == {
                replica.base_url for replica in self.replicas}, f"gateway {name} sees both up")

    def _launch_replicas(self) -> None:
        """Replica 1 loads the model from its directory; replica 2 by Hub id, offline."""
        hub = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(self.hub_cache)}
        models = (self.default_model, Path(BASE_REPO))
        self.replicas = []
        for index, model in enumerate(models, start=1):
            home = self.fresh_home(f"replica{index}")
            settings = EngineSettings(model=model, max_loras=4,
                                      extra_env=self.env(home, **hub) if index == 2
                                      else self.env(home))
            self.replicas.append(EngineProcess(settings, TEST_OUTPUT / f"s3-replica{index}.log"))
        for replica in self.replicas:
            replica.start()

    def start_gateways(self) -> None:
        with ThreadPoolExecutor(2) as pool:
            started = pool.map(self._start_gateway, ("a", "b"))
        self.gateways = dict(zip(("a", "b"), started, strict=True))

    def _start_gateway(self, name: str) -> GatewayProcess:
        home = self.fresh_home(f"gateway-{name}")
        adapters_dir = home / "adapters"
        adapters_dir.mkdir()
        config = write_config(home / "gateway.toml", model=self.default_model,
                              adapters_dir=adapters_dir, roots=[],
                              backends=[replica.base_url for replica in self.replicas],
                              registry_url=self.registry_url, store_url=STORE, eager=True)
        env = self.env(home, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(self.hub_cache))
        return GatewayProcess.start(config, TEST_OUTPUT / f"s3-gateway-{name}.log", env=env)

    def stop(self) -> None:
        for gateway in self.gateways.values():
            gateway.stop()
        for replica in self.replicas:
            replica.stop()


@pytest.fixture(scope="module")
def cluster(default_model, demo_adapters, tmp_path_factory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("object-storage")
    s3 = S3Server()
    postgres = PostgresServer()
    relay: TcpRelay | None = None
    group: Cluster | None = None
    try:
        s3.start()
        s3.create_bucket("dora")
        s3.create_bucket("user", versioned=True)
        postgres.start()
        relay = TcpRelay(int(s3.endpoint.rsplit(":", 1)[1]))
        relay.restore()
        hub_cache = directory / "hub"
        cache_repo(hub_cache, BASE_REPO, _model_files(default_model), COMMIT)
        cache_repo(hub_cache, ADAPTER_REPO,
                       {f"brief/{name}": demo_adapters / "brief" / name for name in FILES},
                       COMMIT)
        group = Cluster(s3, relay, postgres.create_database("objects"), default_model,
                        demo_adapters, directory, hub_cache)
        group.start()
        yield group
    finally:
        if group is not None:
            group.stop()
        if relay is not None:
            relay.cut()
        postgres.remove()
        s3.stop()


def _model_files(model: Path) -> dict[str, Path]:
    return {path.name: path for path in model.iterdir() if path.is_file()}


def s3_client(cluster: Cluster):
    return boto3.client("s3", endpoint_url=cluster.s3.endpoint,
                        aws_access_key_id=cluster.s3.env()["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=cluster.s3.env()["AWS_SECRET_ACCESS_KEY"],
                        region_name="us-east-1")


def put_user_adapter(cluster: Cluster, name: str) -> str:
    """The demo adapter `name`'s files under the user's bucket; its s3:// URL."""
    client = s3_client(cluster)
    for file in FILES:
        client.put_object(Bucket="user", Key=f"adapters/{name}/{file}",
                          Body=(cluster.demo / name / file).read_bytes())
    return f"{USER_ADAPTERS}/{name}/"


def admin(gateway: GatewayProcess) -> httpx.Client:
    return gateway.client(ADMIN_KEY)


def listed(gateway: GatewayProcess) -> dict[str, dict]:
    with admin(gateway) as client:
        response = client.get(ADAPTERS)
    assert response.status_code == 200, response.text
    return {item["name"]: item for item in response.json()["data"]}


def upload(gateway: GatewayProcess, name: str, adapter: Path) -> httpx.Response:
    with admin(gateway) as client:
        return client.post(f"{ADAPTERS}/{name}/upload", files=[
            (file, (file, (adapter / file).read_bytes())) for file in FILES])


def add_source(gateway: GatewayProcess, name: str, source: str) -> httpx.Response:
    with admin(gateway) as client:
        return client.post(ADAPTERS, json={"name": name, "source": source})


def gateway_text(gateway: GatewayProcess, model: str) -> str:
    with gateway.client(GLOBEX_KEY) as client:
        response = client.post("/v1/completions", json={"model": model, "prompt": PROMPT,
                                                        "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def served_models(replica_url: str) -> set[str]:
    """What vLLM itself serves: the base model and the adapters loaded on it."""
    response = httpx.get(f"{replica_url}/v1/models", timeout=60)
    assert response.status_code == 200, response.text
    return {model["id"] for model in response.json()["data"]}


def backends_up(gateway: GatewayProcess) -> set[str]:
    """The replicas `gateway` counts as up (its own health checks, every 5 s)."""
    with admin(gateway) as client:
        metrics = client.get("/metrics").text
    return {sample.labels["backend"] for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "dora_gateway_backend_up" and sample.value == 1}


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CONVERGE_S
    while not check():
        assert time.monotonic() < deadline, f"not within {CONVERGE_S}s: {what}"
        time.sleep(0.2)


def assert_served_as_peft(cluster: Cluster, adapters: dict[str, str]) -> None:
    """Every replica answers each adapter (name -> demo directory) as PEFT does, once it has
    it: the gateways load eagerly, at once on a replica they see up, within their next health
    round on one that came up after them."""
    entries = listed(cluster.gateways["a"])
    internal = {entries[name]["internal_name"] for name in adapters}
    for replica in cluster.replicas:
        eventually(lambda replica=replica: internal <= served_models(replica.base_url),
                   f"{replica.base_url} has {sorted(adapters)} loaded")
    for name, demo_name in adapters.items():
        internal = entries[name]["internal_name"]
        for replica in cluster.replicas:
            completion = complete(replica.base_url, internal, PROMPT)
            gap = max_logprob_gap(cluster.default_model, cluster.demo / demo_name, completion,
                                  f"{name} on {replica.base_url}")
            assert gap < LOGPROB_TOLERANCE, (name, replica.base_url, gap)


def test_an_upload_and_an_s3_add_through_different_gateways_are_served_by_both_replicas(
        cluster):
    a, b = cluster.gateways["a"], cluster.gateways["b"]
    uploaded = upload(a, "caps", cluster.demo / "caps")
    assert uploaded.status_code == 201, uploaded.text
    source = put_user_adapter(cluster, "pirate")
    added = add_source(b, "pirate", source)
    assert added.status_code == 201, added.text
    fetched_from = added.json()["fetched_from"]
    assert fetched_from["url"] == source
    assert all(fetched_from["objects"][file]["etag"] and
               fetched_from["objects"][file]["version_id"] for file in FILES)
    # Eager loading put each on both replicas; each gateway sees the other's add.
    replicas = sorted(replica.base_url for replica in cluster.replicas)
    assert uploaded.json()["loaded_backends"] == replicas
    assert added.json()["loaded_backends"] == replicas
    eventually(lambda: {"caps", "pirate"} <= set(listed(a)) and
               {"caps", "pirate"} <= set(listed(b)), "both gateways list both adapters")
    for entry in (listed(a)["caps"], listed(b)["pirate"]):
        assert entry["source"].startswith(f"{STORE}/adapters/"), entry
    assert_served_as_peft(cluster, {"caps": "caps", "pirate": "pirate"})
    assert gateway_text(a, "pirate") == gateway_text(b, "pirate")
    assert gateway_text(a, "caps") == gateway_text(b, "caps")


def test_an_hf_source_from_an_offline_hub_cache_pins_its_commit(cluster):
    added = add_source(cluster.gateways["a"], "brief", f"hf://{ADAPTER_REPO}/brief")
    assert added.status_code == 201, added.text
    assert added.json()["fetched_from"] == {"url": f"hf://{ADAPTER_REPO}/brief",
                                            "commit": COMMIT}
    assert_served_as_peft(cluster, {"brief": "brief"})


def test_stock_vllm_given_a_hub_id_compiles_a_dora_directory_against_its_snapshot(cluster):
    hub_replica = cluster.replicas[1]
    response = load_adapter(hub_replica.base_url, "pirate-direct", cluster.demo / "pirate")
    assert response.status_code == 200, response.text
    completion = complete(hub_replica.base_url, "pirate-direct", PROMPT)
    assert max_logprob_gap(cluster.default_model, cluster.demo / "pirate",
                           completion) < LOGPROB_TOLERANCE


def test_a_corrupted_artifact_is_not_loaded_and_the_answer_names_it(cluster):
    """A copy of caps's artifact whose weights blob was overwritten: the replica refuses it
    with the object's URL, loads nothing, and keeps serving."""
    client = s3_client(cluster)
    artifact = listed(cluster.gateways["a"])["caps"]["artifact"]
    assert artifact.startswith(f"{STORE}/compiled/"), artifact
    manifest_key = artifact.removeprefix("s3://dora/") + "/manifest.json"
    manifest = json.loads(client.get_object(Bucket="dora", Key=manifest_key)["Body"].read())
    weights = manifest["files"]["adapter_model.safetensors"]
    copy = {**manifest, "files": {**manifest["files"], "adapter_model.safetensors": {
        **weights, "sha256": "0" * 64}}}
    client.put_object(Bucket="dora", Key=f"store/blobs/{'0' * 64}", Body=b"x" * weights["size"])
    client.put_object(Bucket="dora", Key="store/compiled/corrupted/manifest.json",
                      Body=json.dumps(copy).encode())
    response = httpx.post(f"{cluster.replicas[0].base_url}/v1/load_lora_adapter",
                          json={"lora_name": "corrupted",
                                "lora_path": f"{STORE}/compiled/corrupted"}, timeout=300)
    assert response.status_code != 200
    message = response.json()["error"]["message"]
    assert "cannot fetch the adapter from the store" in message, message
    assert f"{STORE}/blobs/{'0' * 64}" in message, message
    assert gateway_text(cluster.gateways["a"], "caps")


def store_keys(cluster: Cluster) -> set[str]:
    """Every key under the store's prefix."""
    pages = s3_client(cluster).get_paginator("list_objects_v2").paginate(Bucket="dora",
                                                                          Prefix="store/")
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def test_a_store_that_is_down_gives_clear_errors_while_loaded_adapters_keep_serving(cluster):
    a, b = cluster.gateways["a"], cluster.gateways["b"]
    source = put_user_adapter(cluster, "caps-lora")
    cluster.relay.cut()
    try:
        added = add_source(a, "caps-lora", source)
        assert added.status_code == 502, added.text
        error = added.json()["error"]
        assert error["code"] == "store_unavailable" and source in error["message"], error
        uploaded = upload(b, "caps-lora-upload", cluster.demo / "caps-lora")
        assert uploaded.status_code == 502, uploaded.text
        assert uploaded.json()["error"]["code"] == "store_unavailable"
        assert gateway_text(a, "caps") == gateway_text(b, "caps")
        assert gateway_text(b, "pirate")
    finally:
        cluster.relay.restore()
    assert not {"caps-lora", "caps-lora-upload"} & set(listed(a))
    assert not {"caps-lora", "caps-lora-upload"} & set(listed(b))


def test_a_gateway_killed_mid_upload_leaves_nothing_and_a_restart_of_everything_serves_the_same(
        cluster):
    a, b = cluster.gateways["a"], cluster.gateways["b"]
    before = {name: gateway_text(a, name) for name in ("caps", "pirate", "brief")}
    keys = store_keys(cluster)
    _kill_mid_upload(a, cluster.demo / "caps-lora")
    assert "caps-lora" not in listed(b)
    # At most whole blobs, never a manifest: nothing under a final key names the upload.
    assert all(key.startswith("store/blobs/") for key in store_keys(cluster) - keys)
    cluster.stop()
    cluster.start()
    a, b = cluster.gateways["a"], cluster.gateways["b"]
    assert set(listed(a)) == set(listed(b)) == {"caps", "pirate", "brief"}
    assert {name: gateway_text(b, name) for name in before} == before
    assert_served_as_peft(cluster, {"caps": "caps", "pirate": "pirate", "brief": "brief"})


def _kill_mid_upload(gateway: GatewayProcess, adapter: Path) -> None:
    """SIGKILL the gateway while an upload's body is half sent."""
    sent_half, killed = threading.Event(), threading.Event()
    body, content_type = _multipart(adapter)

    def chunks() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        sent_half.set()
        killed.wait(120)

    def send() -> None:
        try:
            with admin(gateway) as client:
                client.post(f"{ADAPTERS}/caps-lora/upload", content=chunks(),
                            headers={"Content-Type": content_type})
        except httpx.HTTPError:
            pass

    sender = threading.Thread(target=send)
    sender.start()
    assert sent_half.wait(120)
    gateway.process.kill()
    gateway.process.wait()
    killed.set()
    sender.join(120)


def _multipart(adapter: Path) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x", files=[
        (file, (file, (adapter / file).read_bytes())) for file in FILES])
    return request.read(), request.headers["content-type"]
