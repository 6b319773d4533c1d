"""The registry lasts: with the default SQLite registry under `$DORA_GATEWAY_HOME`, a
restarted gateway (stopped, or killed) serves exactly what it served before, checked with
real requests through a real vLLM."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_OUTPUT
from tests.gateway_process import (
    ADMIN_KEY,
    GLOBEX_KEY,
    PROMPT,
    GatewayProcess,
    gateway_home,
    write_config,
)

pytestmark = pytest.mark.vllm
FILES = ("adapter_config.json", "adapter_model.safetensors")


def served(gateway: GatewayProcess) -> dict[str, str]:
    """Every model the gateway lists, with its greedy answer to one prompt."""
    with gateway.client(GLOBEX_KEY) as client:
        models = [model["id"] for model in client.get("/v1/models").json()["data"]]
        return {model: complete(client, model) for model in models}


def complete(client: httpx.Client, model: str) -> str:
    response = client.post("/v1/completions", json={"model": model, "prompt": PROMPT,
                                                    "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def upload(client: httpx.Client, name: str, directory: Path) -> httpx.Response:
    return client.post(f"/admin/adapters/{name}/upload",
                       files=[(file, (file, (directory / file).read_bytes())) for file in FILES])


def test_admin_changes_survive_a_restart_and_a_kill(engine, default_model, demo_adapters,
                                                    tmp_path):
    home = gateway_home(tmp_path / "home")
    adapters_dir = shutil.copytree(demo_adapters, tmp_path / "adapters")
    config = write_config(tmp_path / "gateway.toml", model=default_model,
                          adapters_dir=adapters_dir, roots=[], backends=[engine.base_url],
                          registry_url="")
    env = {**os.environ, "DORA_GATEWAY_HOME": str(home)}
    log = TEST_OUTPUT / "gateway-registry-durability.log"

    gateway = GatewayProcess.start(config, log, env=env)
    try:
        with gateway.client(ADMIN_KEY) as admin:
            assert admin.post("/admin/adapters", json={"name": "caps2", "path": "caps"}
                              ).status_code == 201
            assert admin.delete("/admin/adapters/brief").status_code == 204
            assert upload(admin, "uploaded", demo_adapters / "pirate").status_code == 201
        before = served(gateway)
    finally:
        gateway.stop()
    assert set(before) == {"base", "caps", "pirate", "caps-lora", "caps2", "uploaded"}
    assert before["caps2"] == before["caps"] and before["uploaded"] == before["pirate"]
    assert (home / "registry.sqlite3").is_file()

    for stop in ("stop", "kill"):
        gateway = GatewayProcess.start(config, log, env=env)
        try:
            assert served(gateway) == before
            with gateway.client(GLOBEX_KEY) as client:
                gone = client.post("/v1/completions", json={"model": "brief", "prompt": PROMPT})
            assert gone.status_code == 404, gone.text
        finally:
            if stop == "kill":
                gateway.process.kill()
                gateway.process.wait()
            gateway.stop()
