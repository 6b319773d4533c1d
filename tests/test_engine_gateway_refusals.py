"""Refusals that come from a real vLLM, seen through a real gateway.

The session's vLLM (`engine`) runs with max_lora_rank 16, and refuses a sound DoRA adapter
of rank 32 itself. The gateway, which knows that limit from its config, refuses the adapter
when it is added; a gateway whose config claims a larger limit lets it in, and the engine's
refusal at load time must then reach clients as a 400 with the engine's reason. Last, a vLLM
that dies at start must be reported with the end of its log and where the log is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.engine.process import free_port
from tests.conftest import TEST_OUTPUT
from tests.engine import load_adapter
from tests.factories import random_adapter
from tests.gateway_process import (
    ACME_KEY,
    ADMIN_KEY,
    GLOBEX_KEY,
    PROMPT,
    GatewayProcess,
    write_config,
)

pytestmark = pytest.mark.vllm
RANK_REFUSAL = "LoRA rank 32 is greater than max_lora_rank 16"


@pytest.fixture(scope="module")
def wide(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sound DoRA adapter of rank 32, in a directory of its own (an admin root)."""
    return random_adapter(default_model, tmp_path_factory.mktemp("wide-root") / "wide", r=32,
                          lora_alpha=32, target_modules=["q_proj", "v_proj"], use_dora=True)


@pytest.fixture(scope="module")
def trusting_gateway(engine, default_model: Path, demo_adapters: Path, wide: Path,
                     tmp_path_factory) -> Iterator[GatewayProcess]:
    """A gateway in front of the session's vLLM whose config wrongly says the backend takes
    rank 32, so admission lets `wide` in and only the engine can refuse it."""
    config = write_config(tmp_path_factory.mktemp("trusting") / "gateway.toml",
                          model=default_model, adapters_dir=demo_adapters, roots=[wide.parent],
                          backends=[engine.base_url], max_lora_rank=32)
    gateway = GatewayProcess.start(config, TEST_OUTPUT / "gateway-trusting.log")
    yield gateway
    gateway.stop()


def admin_view(gateway: GatewayProcess) -> dict[str, dict]:
    with gateway.client(ADMIN_KEY) as admin:
        listing = admin.get("/admin/adapters")
    assert listing.status_code == 200, listing.text
    return {adapter["name"]: adapter for adapter in listing.json()["data"]}


def models(gateway: GatewayProcess) -> list[str]:
    with gateway.client(GLOBEX_KEY) as client:
        return [card["id"] for card in client.get("/v1/models").json()["data"]]


def refusals_counted(gateway: GatewayProcess, adapter: str) -> float:
    text = httpx.get(gateway.url + "/metrics", timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == "dora_gateway_adapter_load_refusals_total"
               and sample.labels.get("adapter") == adapter)


def test_the_engine_refuses_the_rank_and_so_does_adding_it(engine, real_gateway, wide,
                                                          gateway_root):
    direct = load_adapter(engine.base_url, "wide-direct", wide)
    assert direct.status_code >= 400 and RANK_REFUSAL in direct.json()["error"]["message"]
    source = shutil.copytree(wide, gateway_root / "wide")
    with real_gateway.client(ADMIN_KEY) as admin:
        added = admin.post("/admin/adapters", json={"name": "wide", "path": str(source)})
    assert added.status_code == 400, added.text
    error = added.json()["error"]
    assert error["code"] == "invalid_adapter" and error["type"] == "invalid_request_error"
    assert [problem.split(" (")[0] for problem in error["problems"]] == [RANK_REFUSAL]
    assert "wide" not in admin_view(real_gateway) and "wide" not in models(real_gateway)


def test_a_refusal_at_load_time_is_a_400_with_the_engines_reason(engine, trusting_gateway,
                                                                 wide):
    with trusting_gateway.client(ADMIN_KEY) as admin:
        added = admin.post("/admin/adapters", json={"name": "wide", "path": str(wide)})
    assert added.status_code == 201, added.text
    body = {"model": "wide", "prompt": PROMPT, "max_tokens": 2}
    with trusting_gateway.client(GLOBEX_KEY) as client:
        answers = [client.post("/v1/completions", json=body),
                   client.post("/v1/completions", json={**body, "stream": True})]
        base = client.post("/v1/completions", json={**body, "model": "base"})
    for answer in answers:
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "adapter_unavailable" and error["param"] == "model"
        assert RANK_REFUSAL in error["message"]
    wide_view = admin_view(trusting_gateway)["wide"]
    assert wide_view["servable"] is False and wide_view["loaded_backends"] == []
    assert wide_view["refused_by"]["backend"] == engine.base_url
    assert RANK_REFUSAL in wide_view["refused_by"]["reason"]
    assert admin_view(trusting_gateway)["caps"]["servable"]
    assert refusals_counted(trusting_gateway, "wide") == 1
    assert "wide" not in models(trusting_gateway) and "caps" in models(trusting_gateway)
    with trusting_gateway.client(ACME_KEY) as acme:  # a tenant that may not use it learns nothing
        hidden = acme.post("/v1/completions", json=body)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"
    assert base.status_code == 200, base.text


def test_a_vllm_that_dies_at_start_is_reported_with_its_log(default_model, tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[model]
path = "{default_model}"
[engine]
extra_args = ["--no-such-option"]
[tenants.acme]
api_keys = ["{ACME_KEY}"]
""")
    home = tmp_path / "home"
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--config",
                             str(config), "--port", str(free_port())], capture_output=True,
                            text=True, check=False, timeout=600,
                            env={**os.environ, "DORA_GATEWAY_HOME": str(home)})
    log_path = home / "logs" / "vllm-gateway.log"
    assert result.returncode == 1, result.stderr
    assert "dora-gateway serve: vLLM exited during start-up with status" in result.stderr
    assert f"the end of its log ({log_path}):" in result.stderr
    assert "unrecognized arguments: --no-such-option" in result.stderr
    assert "unrecognized arguments: --no-such-option" in log_path.read_text()
    assert "Traceback" not in result.stderr
