"""The deployment files in deploy/, checked against the tools and the code they serve.

promtool checks the Prometheus config and alert rules (and runs their unit tests); every
PromQL expression of the Grafana dashboard goes through promtool too. The metric names those
expressions use must be ones the real gateway and vLLM expose, and a real Prometheus, run with
deploy/prometheus/prometheus.yml pointed at them, must scrape both. The gateway configs the
deployments ship must load, and the compose and Kubernetes files must refer to each other
consistently. (No Docker daemon or cluster is needed: images are not built here.)
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.config import load_config
from gateway.engine.process import free_port, wait_until_ok
from tests.gateway_process import GLOBEX_KEY, PROMPT, data_events, poll_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dora-gateway.json"
K8S = DEPLOY / "k8s"
METRIC_NAME = re.compile(r"\b(?:dora_gateway_\w+|vllm:[\w:]+)")
# Grafana's variables, replaced by values that make each query plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$tenant": ".*", "$adapter": ".*"}
SCRAPE_TIMEOUT_S = 60


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: `make test-tools` (scripts/test_tools.sh) installs it"
    return path


def promtool(*args: str) -> None:
    result = subprocess.run([tool("promtool"), *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, (f"promtool {' '.join(args)} failed:\n"
                                    f"{result.stdout}{result.stderr}")


def dashboard_panels() -> list[dict]:
    """Every panel but rows, including those inside collapsed rows."""
    panels = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return panels


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def alert_exprs() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def exposed_names(text: str) -> set[str]:
    """Every sample name a /metrics page has or may have (a labelled family with no
    children yet shows only its TYPE line)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_prometheus_config_and_alert_rules_pass_promtool():
    promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    promtool("test", "rules", str(PROMETHEUS_DIR / "alerts.test.yml"))


def test_dashboard_panels_query_prometheus_with_valid_promql(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert {"tenant", "adapter"} <= set(variables)
    panels = dashboard_panels()
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    # promtool parses every query, as the expression of a throwaway alert rule.
    rules = [{"alert": f"panel_{index}", "expr": _plain_promql(expr)}
             for index, expr in enumerate(dashboard_exprs())]
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(rules_file))


def _plain_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def test_compose_wires_the_services_prometheus_scrapes():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"vllm", "gateway", "postgres", "prometheus", "grafana"}
    assert services["gateway"]["deploy"]["replicas"] == 2
    assert services["gateway"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    registry_url = services["gateway"]["environment"]["DORA_GATEWAY_REGISTRY_URL"]
    postgres = services["postgres"]["environment"]
    assert registry_url.startswith(f"postgresql://{postgres['POSTGRES_USER']}:")
    assert registry_url.endswith(f"@postgres:5432/{postgres['POSTGRES_DB']}")
    vllm_args = services["vllm"]["command"]
    assert {"--enable-lora", "--served-model-name=base", "--port=8000"} <= set(vllm_args)
    assert services["vllm"]["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    metrics_dir = services["vllm"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert metrics_dir in services["vllm"]["tmpfs"]  # fresh with every container
    assert services["gateway"]["command"] == ["--backend", "dns+http://vllm:8000"]
    assert services["vllm"]["deploy"]["replicas"] == 2
    for name in ("vllm", "gateway"):
        assert "data:/data" in services[name]["volumes"], name
        dockerfile = DEPLOY / services[name]["build"]["context"] / services[name]["build"][
            "dockerfile"]
        assert dockerfile.is_file(), dockerfile
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"compose.yaml mounts {source}: missing"
    scraped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scraped}
    assert targets == {"dora-gateway": ["gateway:8080"], "vllm": ["vllm:8000"]}


def test_kubernetes_manifests_are_complete_and_refer_to_each_other():
    documents = [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml_documents(path)]
    for doc in documents:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        assert doc["metadata"].get("name"), doc
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in documents:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    assert {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= set(by_kind)
    templates = [deployment["spec"]["template"] for deployment in by_kind["Deployment"].values()]
    workloads = [*templates, *(statefulset["spec"]["template"]
                               for statefulset in by_kind.get("StatefulSet", {}).values())]
    for deployment in by_kind["Deployment"].values():
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]
    for name, service in by_kind["Service"].items():
        assert any(service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
                   for template in workloads), f"Service {name} selects no pods"
    for template in templates:
        assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        for volume in template["spec"]["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in by_kind[
                    "PersistentVolumeClaim"]
            if "configMap" in volume:
                assert volume["configMap"]["name"] in by_kind["ConfigMap"]
    assert by_kind["Deployment"]["dora-vllm"]["spec"]["replicas"] == 2
    assert by_kind["Service"]["dora-vllm"]["spec"]["clusterIP"] == "None"  # headless
    gateway_toml = tomllib.loads(by_kind["ConfigMap"]["dora-gateway-config"]["data"][
        "gateway.toml"])
    assert gateway_toml["engine"]["backends"] == ["dns+http://dora-vllm:8000"]
    vllm = by_kind["Deployment"]["dora-vllm"]["spec"]["template"]["spec"]["containers"][0]
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--enable-lora" in vllm["args"]
    metrics_dir = next(env["value"] for env in vllm["env"]
                       if env["name"] == "PROMETHEUS_MULTIPROC_DIR")
    mounted = {mount["mountPath"]: mount["name"] for mount in vllm["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in
               by_kind["Deployment"]["dora-vllm"]["spec"]["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounted[metrics_dir]]
    gateway = by_kind["Deployment"]["dora-gateway"]["spec"]
    assert gateway["replicas"] == 2
    assert "dora-postgres" in by_kind["StatefulSet"] and "dora-postgres" in by_kind["Service"]


def env_keys(config_text: str) -> set[str]:
    """The variables of the config's "env:VAR" values."""
    def values(node: object) -> Iterator[object]:
        if isinstance(node, dict | list):
            for child in node.values() if isinstance(node, dict) else node:
                yield from values(child)
        yield node

    return {value.removeprefix("env:") for value in values(tomllib.loads(config_text))
            if isinstance(value, str) and value.startswith("env:")}


def _shipped_configs() -> dict[str, tuple[str, set[str]]]:
    """Each gateway config a deployment ships, with the env variables it gets there."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    gateway = next(doc for doc in yaml_documents(K8S / "gateway.yaml")
                   if doc["kind"] == "Deployment")
    k8s_env = {env["name"] for env in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    docker_env = env_keys((DEPLOY / "docker" / "gateway.toml").read_text())
    return {
        "docker/gateway.toml": ((DEPLOY / "docker" / "gateway.toml").read_text(), docker_env),
        "gateway.compose.toml": ((DEPLOY / "gateway.compose.toml").read_text(),
                                 set(compose["services"]["gateway"]["environment"])),
        "k8s/configmap.yaml": (yaml.safe_load((K8S / "configmap.yaml").read_text())["data"][
            "gateway.toml"], k8s_env),
    }


@pytest.mark.parametrize("name", sorted(_shipped_configs()))
def test_shipped_gateway_configs_load(name, tmp_path):
    """Loaded as the gateway loads them, with the image's paths moved under tmp_path and
    every env: key given by the deployment."""
    text, environment = _shipped_configs()[name]
    needed = env_keys(text)
    assert needed <= environment, f"{name} reads {sorted(needed - environment)}, not set"
    (tmp_path / "data" / "adapters").mkdir(parents=True)
    (tmp_path / "opt" / "demo-adapters").mkdir(parents=True)
    text = text.replace('"/data/', f'"{tmp_path}/data/').replace(
        '"/opt/dora-gateway/', f'"{tmp_path}/opt/')
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(text)
    environ = {var: f"key-for-{var}-0123456789" for var in needed}
    if "DORA_GATEWAY_REGISTRY_URL" in environ:
        environ["DORA_GATEWAY_REGISTRY_URL"] = "postgresql://dora:secret@postgres/dora_gateway"
    config = load_config(config_file, environ=environ)
    assert config.server.host == "0.0.0.0"
    assert config.tenants


def test_kubernetes_gives_the_gateway_time_to_drain():
    """The pod's termination grace covers preStop's pause, the gateway's drain and a margin
    for the last answers, so SIGKILL never cuts a drain short."""
    pod = next(doc for doc in yaml_documents(K8S / "gateway.yaml")
               if doc["kind"] == "Deployment")["spec"]["template"]["spec"]
    pause = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]["gateway.toml"]
    drain = tomllib.loads(config)["server"]["shutdown_grace_seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pause + drain + 5


@pytest.fixture(scope="module")
def served_request(real_gateway) -> None:
    """One small streamed completion of `base` through the gateway, so request series exist."""
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with (real_gateway.client(GLOBEX_KEY) as client,
          client.stream("POST", "/v1/completions", json=body) as response):
        assert response.status_code == 200, response.read()
        assert list(data_events(response.iter_lines()))[-1] == "[DONE]"


@pytest.mark.vllm
def test_dashboard_and_alerts_use_only_metrics_the_gateway_and_vllm_expose(
        real_gateway, engine, served_request):
    # The engine's cost figures appear once the gateway's health checks have read a step.
    poll_until(lambda: "dora_gateway_engine_added_cost_ratio{" in httpx.get(
        real_gateway.url + "/metrics", timeout=30).text,
        "the gateway never showed the engine's cost figures", timeout_s=120)
    gateway_page = httpx.get(real_gateway.url + "/metrics", timeout=30)
    assert gateway_page.status_code == 200, gateway_page.text
    assert re.search(r'^dora_gateway_requests_total\{[^}]*adapter="base"', gateway_page.text,
                     re.MULTILINE), gateway_page.text
    exposed = exposed_names(gateway_page.text) | exposed_names(
        httpx.get(engine.base_url + "/metrics", timeout=30).text)
    dashboard = json.loads(DASHBOARD.read_text())
    variable_queries = [variable["definition"] for variable in dashboard["templating"]["list"]
                        if variable["type"] == "query"]
    for source, exprs in (("the dashboard", dashboard_exprs() + variable_queries),
                          ("alerts.yml", alert_exprs())):
        used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
        assert used, source
        assert not used - exposed, f"{source} uses metrics nobody exposes: {used - exposed}"


@pytest.mark.vllm
def test_prometheus_scrapes_gateway_and_vllm_with_the_deploy_config(
        real_gateway, engine, served_request, tmp_path):
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    targets = {"dora-gateway": real_gateway.url, "vllm": engine.base_url}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [httpx.URL(targets.pop(job["job_name"])).netloc
                                              .decode()]}]
    assert not targets, f"prometheus.yml has no job for {targets}"
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    with running_prometheus(config_file, tmp_path) as api:
        series = wait_for_series(api, "dora_gateway_requests_total",
                                 lambda labels: labels.get("adapter") == "base")
        assert series["job"] == "dora-gateway" and series["tenant"] == "globex"
        wait_for_series(api, 'up{job="vllm"} == 1', lambda labels: True)


@contextmanager
def running_prometheus(config_file: Path, work_dir: Path) -> Iterator[str]:
    """A real Prometheus on a free loopback port; its API's base URL."""
    port = free_port()
    log_path = work_dir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config_file}",
             f"--storage.tsdb.path={work_dir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    api = f"{root}/api/v1"
    try:
        # Prometheus listens before it is ready: it answers 503 while its storage starts.
        if not wait_until_ok(f"{root}/-/ready", process, SCRAPE_TIMEOUT_S):
            raise AssertionError(f"Prometheus was not ready (exit code {process.poll()})")
        yield api
    except AssertionError as failure:
        raise AssertionError(f"{failure}\nPrometheus's targets: {_targets(api)}\nits log:\n"
                             f"{log_path.read_text(errors='replace')[-3000:]}") from None
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_series(api: str, query: str, wanted) -> dict[str, str]:
    """The labels of the first series of `query` that `wanted` accepts, polling until one
    comes back."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{api}/query", params={"query": query}, timeout=5)
            result = response.json() if response.status_code == 200 else {}
        except httpx.HTTPError:
            result = {}
        for series in result.get("data", {}).get("result", []):
            if wanted(series["metric"]):
                return series["metric"]
        time.sleep(1)
    raise AssertionError(f"no wanted series for {query!r} in {SCRAPE_TIMEOUT_S}s")


def _targets(api: str) -> str:
    try:
        return httpx.get(f"{api}/targets", timeout=5).text
    except httpx.HTTPError as exc:
        return f"(unreachable: {exc})"
