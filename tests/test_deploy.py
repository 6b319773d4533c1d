"""The deployment files in deploy/, checked against the tools and the code they serve.

promtool checks the Prometheus config and alert rules (and runs their unit tests); every
PromQL expression of the Grafana dashboard goes through promtool too. The metric names those
expressions use must be ones the real gateway and vLLM expose, and a real Prometheus, run with
deploy/prometheus/prometheus.yml pointed at them, must scrape both. The gateway configs the
deployments ship must load, and the compose and Kubernetes files must refer to each other
consistently: gateways and vLLM share no volume, only the object store, which both reach with
the same endpoint and keys, and replicated gateways count rate limits in one Redis that only
they reach. (No Docker daemon or cluster is needed: images are not built here.)
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
from urllib.parse import urlsplit

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
COMPOSE = DEPLOY / "compose.yaml"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
LIMITS_URL_VARIABLE = "DORA_GATEWAY_LIMITS_URL"
REDIS_PORT = 6379
# Kubernetes quantities as sizeLimit writes them: 16Gi, 512Mi, 1G...
QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
QUANTITY_UNITS = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
                  "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
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


def k8s_resources() -> dict[str, dict[str, dict]]:
    """Every resource of deploy/k8s, by kind and name."""
    by_kind: dict[str, dict[str, dict]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml_documents(path):
            by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    return by_kind


def k8s_pod(by_kind: dict[str, dict[str, dict]], deployment: str) -> dict:
    return by_kind["Deployment"][deployment]["spec"]["template"]["spec"]


def k8s_env(pod: dict) -> dict[str, dict]:
    """The first container's env entries, by name."""
    return {entry["name"]: entry for entry in pod["containers"][0].get("env", [])}


def k8s_env_value(by_kind: dict[str, dict[str, dict]], entry: dict) -> str:
    """A plain value, or the ConfigMap key it refers to (which must exist)."""
    if "value" in entry:
        return entry["value"]
    ref = entry["valueFrom"]["configMapKeyRef"]
    data = by_kind["ConfigMap"][ref["name"]]["data"]
    assert ref["key"] in data, f"ConfigMap {ref['name']} has no key {ref['key']}"
    return data[ref["key"]]


def k8s_volume_holding(pod: dict, path: str) -> dict:
    """The volume that holds `path` in the pod's first container (its deepest mount)."""
    mounts = [mount for mount in pod["containers"][0]["volumeMounts"]
              if Path(path).is_relative_to(mount["mountPath"])]
    assert mounts, f"{path} is on no volume: the container's own layer"
    mount = max(mounts, key=lambda mount: len(mount["mountPath"]))
    return next(volume for volume in pod["volumes"] if volume["name"] == mount["name"])


def quantity_bytes(quantity: str) -> int:
    match = QUANTITY.fullmatch(str(quantity))
    assert match, f"not a quantity this test reads: {quantity!r}"
    return int(match[1]) * QUANTITY_UNITS[match[2]]


def gateway_store(config_text: str) -> dict:
    return tomllib.loads(config_text).get("store", {})


def k8s_gateway_config(by_kind: dict[str, dict[str, dict]]) -> str:
    return by_kind["ConfigMap"]["dora-gateway-config"]["data"]["gateway.toml"]


def compose_services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def compose_mounts(service: dict) -> list[tuple[str | None, str, str]]:
    """(source, target, mode) of each of the service's volumes; source None: anonymous."""
    mounts = []
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"long syntax, which this test does not read: {volume}"
        parts = volume.split(":")
        if len(parts) == 1:
            mounts.append((None, parts[0], "rw"))
        else:
            mounts.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return mounts


def redis_option(args: list[str], option: str) -> str:
    """The value redis-server's command line gives `option` (`--option value`)."""
    assert args[0] == "redis-server", args
    assert args.count(option) == 1, f"{option} given {args.count(option)} times: {args}"
    index = args.index(option)
    assert index + 1 < len(args), f"{option} has no value: {args}"
    return args[index + 1]


def assert_redis_persists_budgets(args: list[str]) -> str:
    """The counters' Redis keeps an append-only file, fsynced every second, no RDB snapshots:
    the per-day and per-month budgets survive a restart. Its data directory (--dir)."""
    assert redis_option(args, "--appendonly") == "yes", f"no append-only file: {args}"
    assert redis_option(args, "--appendfsync") == "everysec", args
    assert redis_option(args, "--save") == "", f"RDB snapshots on: {args}"
    directory = redis_option(args, "--dir")
    assert Path(directory).is_absolute(), f"--dir {directory!r}"
    return directory


def compose_variables(value: str) -> str:
    """`value` with each ${VAR...} reduced to ${VAR}: the same variables, whatever message or
    default each use gives."""
    return re.sub(r"\$\{(\w+)[^}]*\}", r"${\1}", value)


def compose_endpoint(environment: dict) -> str:
    endpoints = [environment[name] for name in ENDPOINT_VARIABLES if name in environment]
    assert endpoints, f"no {' or '.join(ENDPOINT_VARIABLES)}"
    return endpoints[0]


def test_compose_wires_the_services_prometheus_scrapes():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"vllm", "gateway", "postgres", "redis", "minio", "minio-bucket",
                             "prometheus", "grafana"}
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
    by_kind = k8s_resources()
    assert sum(map(len, by_kind.values())) == len(documents), "two resources of one name"
    assert {"Deployment", "Service", "ConfigMap"} <= set(by_kind)
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
    for name in ("dora-gateway", "dora-vllm"):  # the others serve no /metrics
        template = by_kind["Deployment"][name]["spec"]["template"]
        assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    for template in templates:
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in by_kind.get(
                    "PersistentVolumeClaim", {})
            if "configMap" in volume:
                assert volume["configMap"]["name"] in by_kind["ConfigMap"]
    assert by_kind["Deployment"]["dora-vllm"]["spec"]["replicas"] == 2
    assert by_kind["Service"]["dora-vllm"]["spec"]["clusterIP"] == "None"  # headless
    gateway_toml = tomllib.loads(k8s_gateway_config(by_kind))
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


def _shipped_configs() -> dict[str, tuple[str, dict[str, str]]]:
    """Each gateway config a deployment ships, with the env variables it gets there: their
    values where the deployment writes them out, "" where they come from a Secret or the
    shell."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    gateway = next(doc for doc in yaml_documents(K8S / "gateway.yaml")
                   if doc["kind"] == "Deployment")
    k8s_env = {env["name"]: env.get("value", "")
               for env in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    compose_env = {name: "" if "${" in value else value
                   for name, value in compose["services"]["gateway"]["environment"].items()}
    docker_env = dict.fromkeys(env_keys((DEPLOY / "docker" / "gateway.toml").read_text()), "")
    return {
        "docker/gateway.toml": ((DEPLOY / "docker" / "gateway.toml").read_text(), docker_env),
        "gateway.compose.toml": ((DEPLOY / "gateway.compose.toml").read_text(), compose_env),
        "k8s/configmap.yaml": (k8s_gateway_config(k8s_resources()), k8s_env),
    }


def _gateway_processes() -> dict[str, int]:
    """How many gateways run each shipped config."""
    return {
        "docker/gateway.toml": 1,
        "gateway.compose.toml": compose_services()["gateway"]["deploy"]["replicas"],
        "k8s/configmap.yaml": k8s_resources()["Deployment"]["dora-gateway"]["spec"]["replicas"],
    }


@pytest.mark.parametrize("name", sorted(_shipped_configs()))
def test_shipped_gateway_configs_load(name, tmp_path):
    """Loaded as the gateway loads them, with the image's paths moved under tmp_path and
    every env: key given by the deployment."""
    text, environment = _shipped_configs()[name]
    needed = env_keys(text)
    assert needed <= set(environment), f"{name} reads {sorted(needed - set(environment))}, not set"
    (tmp_path / "data" / "adapters").mkdir(parents=True)
    (tmp_path / "opt" / "demo-adapters").mkdir(parents=True)
    text = text.replace('"/data/', f'"{tmp_path}/data/').replace(
        '"/opt/dora-gateway/', f'"{tmp_path}/opt/')
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(text)
    environ = {var: environment[var] or f"key-for-{var}-0123456789" for var in needed}
    if "DORA_GATEWAY_REGISTRY_URL" in environ:
        environ["DORA_GATEWAY_REGISTRY_URL"] = "postgresql://dora:secret@postgres/dora_gateway"
    config = load_config(config_file, environ=environ)
    assert config.server.host == "0.0.0.0"
    assert config.tenants
    # The deployment's own Redis URL, as the gateway reads it ("" for counters in memory)
    assert config.limits.store == environ.get(LIMITS_URL_VARIABLE, "")
    assert config.limits.fail == "open"


def test_kubernetes_gives_the_gateway_time_to_drain():
    """The pod's termination grace covers preStop's pause, the gateway's drain and a margin
    for the last answers, so SIGKILL never cuts a drain short."""
    pod = next(doc for doc in yaml_documents(K8S / "gateway.yaml")
               if doc["kind"] == "Deployment")["spec"]["template"]["spec"]
    pause = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = tomllib.loads(k8s_gateway_config(k8s_resources()))["server"][
        "shutdown_grace_seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pause + drain + 5


def test_replicated_gateways_keep_their_artifacts_in_object_storage():
    """Where gateways and vLLM run as several processes (replicas, or vLLM apart from the
    gateway), they share no directory: the config each deployment gives them names a bucket."""
    services = compose_services()
    by_kind = k8s_resources()
    processes = {
        "docker/gateway.toml": 1,  # one container: the gateway and the vLLM it starts
        "gateway.compose.toml": (services["gateway"]["deploy"]["replicas"]
                                 + services["vllm"]["deploy"]["replicas"]),
        "k8s/configmap.yaml": sum(by_kind["Deployment"][name]["spec"]["replicas"]
                                  for name in ("dora-gateway", "dora-vllm")),
    }
    configs = _shipped_configs()
    assert set(processes) == set(configs)
    replicated = [name for name, count in processes.items() if count > 1]
    assert replicated
    for name in replicated:
        url = gateway_store(configs[name][0]).get("url", "")
        assert url.startswith("s3://"), f"{name}: [store] url {url!r}, not a bucket"


def test_replicated_gateways_count_rate_limits_in_one_store():
    """Several gateways of one config would each give a tenant a limit of its own with
    counters in memory: their config takes [limits] store from DORA_GATEWAY_LIMITS_URL, which
    the deployment sets to a Redis URL. One gateway keeps its counters in memory."""
    configs = _shipped_configs()
    gateways = _gateway_processes()
    assert set(gateways) == set(configs)
    assert [name for name, count in gateways.items() if count > 1]
    for name, (text, environment) in configs.items():
        store = tomllib.loads(text).get("limits", {}).get("store", "")
        if gateways[name] == 1:
            assert not store, f"{name}: one gateway with a [limits] store {store!r}"
            continue
        assert store == f"env:{LIMITS_URL_VARIABLE}", f"{name}: [limits] store {store!r}"
        url = urlsplit(environment.get(LIMITS_URL_VARIABLE, ""))
        assert url.scheme in ("redis", "rediss") and url.hostname, (
            f"{name}: {LIMITS_URL_VARIABLE} is {url.geturl()!r}, not a Redis URL")


def test_compose_gateways_count_rate_limits_in_the_redis_service():
    """Every gateway service (each mounts a gateway config) reaches `redis` at the URL it is
    given and starts once Redis answers; Redis publishes no port and keeps its append-only
    file (the budgets) in a named volume of its own, which survives the container."""
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    redis = services["redis"]
    assert re.fullmatch(r"redis:\d+\.\d+-alpine", redis["image"]), f"{redis['image']}: not pinned"
    assert "ports" not in redis, "Redis published outside the compose network"
    directory = assert_redis_persists_budgets(redis["command"])
    [(source, target, mode)] = compose_mounts(redis)
    assert target == directory and mode == "rw", (source, target, mode)
    assert source in compose["volumes"], f"{source}: not a named volume of compose.yaml"
    others = [name for name, service in services.items() if name != "redis"
              and any(other == source for other, _, _ in compose_mounts(service))]
    assert not others, f"{others} mount Redis's volume {source}"
    assert redis["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    gateways = [name for name, service in services.items()
                if any(target == "/etc/dora-gateway/gateway.toml"
                       for _, target, _ in compose_mounts(service))]
    assert gateways == ["gateway"], gateways
    for name in gateways:
        url = urlsplit(services[name]["environment"][LIMITS_URL_VARIABLE])
        assert (url.scheme, url.hostname, url.path) == ("redis", "redis", "/0"), name
        assert str(url.port) in redis["expose"], f"{name} reaches Redis on {url.port}"
        waits_for = services[name]["depends_on"].get("redis", {}).get("condition")
        assert waits_for == "service_healthy", f"{name} starts before Redis answers"


def test_kubernetes_gateways_count_rate_limits_in_the_redis_service():
    """DORA_GATEWAY_LIMITS_URL names the ClusterIP Service of one Redis pod, on its port;
    Redis runs as non-root with an append-only file on a ReadWriteOnce claim of its own (the
    budgets survive a restart), and only the gateway pods are admitted."""
    by_kind = k8s_resources()
    url = urlsplit(k8s_env_value(by_kind, k8s_env(k8s_pod(by_kind, "dora-gateway"))[
        LIMITS_URL_VARIABLE]))
    assert (url.scheme, url.port, url.path) == ("redis", REDIS_PORT, "/0"), url.geturl()
    assert url.hostname in by_kind["Service"], f"{url.geturl()}: no Service {url.hostname}"
    service = by_kind["Service"][url.hostname]["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP" and service.get("clusterIP") != "None"
    ports = [port for port in service["ports"] if port["port"] == url.port]
    assert ports, f"Service {url.hostname} has no port {url.port}"
    [port] = ports
    [redis] = [deployment for deployment in by_kind["Deployment"].values()
               if service["selector"].items()
               <= deployment["spec"]["template"]["metadata"]["labels"].items()]
    assert redis["spec"]["replicas"] == 1
    # Never two counting at once, during a rollout either
    assert redis["spec"]["strategy"]["type"] == "Recreate"
    pod = redis["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    # The claim's files get the group Redis runs as, so it can write its append-only file
    assert security.get("fsGroup") is not None, "the claim may not be writable by Redis"
    assert security["fsGroup"] == security.get("runAsGroup", security["fsGroup"])
    [container] = pod["containers"]
    assert container["image"].startswith("redis:")
    assert {entry["containerPort"] for entry in container["ports"]
            if port["targetPort"] in (entry.get("name"), entry["containerPort"])} == {REDIS_PORT}
    directory = assert_redis_persists_budgets(container["args"])
    volume = k8s_volume_holding(pod, directory)
    assert set(volume) == {"name", "persistentVolumeClaim"}, (
        f"Redis's {directory} is on {volume}: lost with the pod")
    claim_name = volume["persistentVolumeClaim"]["claimName"]
    claim = by_kind.get("PersistentVolumeClaim", {}).get(claim_name)
    assert claim, f"no PersistentVolumeClaim {claim_name}"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], claim["spec"]["accessModes"]
    assert quantity_bytes(claim["spec"]["resources"]["requests"]["storage"]) > 0
    mounting = [name for name, deployment in by_kind["Deployment"].items()
                if any(entry.get("persistentVolumeClaim", {}).get("claimName") == claim_name
                       for entry in deployment["spec"]["template"]["spec"].get("volumes", []))]
    assert mounting == [redis["metadata"]["name"]], f"{mounting} mount {claim_name}"
    assert {"requests", "limits"} <= set(container["resources"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["exec"]["command"] == ["redis-cli", "ping"], probe
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    gateway_labels = by_kind["Deployment"]["dora-gateway"]["spec"]["template"]["metadata"][
        "labels"]
    other_pods = [workload["spec"]["template"]["metadata"]["labels"]
                  for kind in ("Deployment", "StatefulSet")
                  for name, workload in by_kind.get(kind, {}).items() if name != "dora-gateway"]
    policies = [policy["spec"] for policy in by_kind["NetworkPolicy"].values()
                if policy["spec"]["podSelector"].get("matchLabels", {}).items()
                <= redis_labels.items()]
    assert policies, "no NetworkPolicy keeps other pods off Redis"
    rules = [rule for spec in policies for rule in spec.get("ingress", [])]
    assert rules, "no pod is admitted to Redis"
    for rule in rules:  # an absent `ports` or `from` admits every port or every peer
        assert [port.get("port") for port in rule.get("ports") or [{}]] == [REDIS_PORT], rule
        assert rule.get("from"), f"Redis admits every pod: {rule}"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"Redis admits {peer}"
            selected = peer["podSelector"]["matchLabels"].items()
            assert selected <= gateway_labels.items(), f"Redis admits {peer}, not the gateways"
            assert not any(selected <= labels.items() for labels in other_pods), (
                f"Redis admits other pods too: {peer}")


def test_kubernetes_gateway_and_vllm_pods_share_no_volume():
    by_kind = k8s_resources()
    claims = [*by_kind.get("PersistentVolumeClaim", {}).values(),
              *(claim for statefulset in by_kind.get("StatefulSet", {}).values()
                for claim in statefulset["spec"].get("volumeClaimTemplates", []))]
    for claim in claims:
        assert "ReadWriteMany" not in claim["spec"]["accessModes"], claim["metadata"]["name"]
    # A Deployment's claim (Redis's) is held by one pod at a time: one replica, recreated
    for name, deployment in by_kind["Deployment"].items():
        if any("persistentVolumeClaim" in volume
               for volume in deployment["spec"]["template"]["spec"].get("volumes", [])):
            assert deployment["spec"].get("replicas", 1) == 1, name
            assert deployment["spec"].get("strategy", {}).get("type") == "Recreate", name
    for name in ("dora-gateway", "dora-vllm"):
        for volume in k8s_pod(by_kind, name)["volumes"]:
            kinds = set(volume) - {"name"}
            assert kinds <= {"emptyDir", "configMap", "secret"}, (
                f"{name} mounts {volume}: storage that outlives the pod or that other pods "
                f"may mount")


def test_kubernetes_caches_are_per_pod_and_bounded_below_their_volume():
    """The gateway's cache ([store] in the ConfigMap) and vLLM's (DORA_GATEWAY_CACHE_*) are on
    an emptyDir of the pod's, on disk, bounded below the volume's sizeLimit (past it, the
    kubelet evicts the pod)."""
    by_kind = k8s_resources()
    store = gateway_store(k8s_gateway_config(by_kind))
    gateway = k8s_pod(by_kind, "dora-gateway")
    vllm = k8s_pod(by_kind, "dora-vllm")
    vllm_env = k8s_env(vllm)
    assert {"cache_dir", "cache_max_bytes"} <= set(store), (
        "the ConfigMap's [store] leaves the cache to the defaults")
    caches = {"dora-gateway": (gateway, store["cache_dir"], store["cache_max_bytes"]),
              "dora-vllm": (vllm, k8s_env_value(by_kind, vllm_env["DORA_GATEWAY_CACHE_DIR"]),
                            int(k8s_env_value(by_kind,
                                              vllm_env["DORA_GATEWAY_CACHE_MAX_BYTES"])))}
    for name, (pod, directory, max_bytes) in caches.items():
        volume = k8s_volume_holding(pod, directory)
        assert "emptyDir" in volume, f"{name}'s cache {directory} is on {volume}"
        assert volume["emptyDir"].get("medium") != "Memory", f"{name}: a cache in memory"
        limit = quantity_bytes(volume["emptyDir"]["sizeLimit"])
        assert 0 < max_bytes < limit, f"{name}: cache of {max_bytes} bytes on {limit}"


def test_kubernetes_gateway_and_vllm_reach_one_store():
    """Both Deployments get the store's endpoint and region (from a ConfigMap or a value)
    and its keys from a Secret; gateway and vLLM must see the same store."""
    by_kind = k8s_resources()
    seen = {}
    for name in ("dora-gateway", "dora-vllm"):
        env = k8s_env(k8s_pod(by_kind, name))
        endpoints = [variable for variable in ENDPOINT_VARIABLES if variable in env]
        assert endpoints, f"{name} has no {' or '.join(ENDPOINT_VARIABLES)}"
        for variable in CREDENTIAL_VARIABLES:
            assert variable in env, f"{name} has no {variable}"
            assert "secretKeyRef" in env[variable].get("valueFrom", {}), (
                f"{name}'s {variable} is not from a Secret")
        endpoint = k8s_env_value(by_kind, env[endpoints[0]])
        assert urlsplit(endpoint).scheme in ("http", "https") and urlsplit(endpoint).hostname
        seen[name] = (endpoint, k8s_env_value(by_kind, env["AWS_REGION"]))
    assert seen["dora-gateway"] == seen["dora-vllm"]


def test_kubernetes_network_policies_let_the_pods_reach_the_store():
    """Ingress is restricted; a policy that restricts the egress of gateway or vLLM pods must
    admit the store's port."""
    by_kind = k8s_resources()
    env = k8s_env(k8s_pod(by_kind, "dora-gateway"))
    endpoint = urlsplit(k8s_env_value(by_kind, env[next(
        variable for variable in ENDPOINT_VARIABLES if variable in env)]))
    store_port = endpoint.port or {"http": 80, "https": 443}[endpoint.scheme]
    policies = list(by_kind["NetworkPolicy"].values())
    for name in ("dora-gateway", "dora-vllm"):
        labels = by_kind["Deployment"][name]["spec"]["template"]["metadata"]["labels"]
        selecting = [policy["spec"] for policy in policies
                     if policy["spec"]["podSelector"].get("matchLabels", {}).items()
                     <= labels.items()]
        for spec in selecting:
            types = spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec
                                                               else [])]
            if "Egress" in types:
                ports = [port.get("port") for rule in spec.get("egress", [])
                         for port in rule.get("ports") or [{}]]
                assert None in ports or store_port in ports, (
                    f"a NetworkPolicy keeps {name} from the store's port {store_port}")
    vllm_labels = by_kind["Deployment"]["dora-vllm"]["spec"]["template"]["metadata"]["labels"]
    assert any(policy["spec"]["podSelector"]["matchLabels"].items() <= vllm_labels.items()
               for policy in policies), "no NetworkPolicy keeps clients off vLLM"


def test_docs_create_the_secrets_the_kubernetes_pods_read():
    """docs/deploy.md's `kubectl create secret` commands give every key a pod reads."""
    by_kind = k8s_resources()
    read = set()
    for kind in ("Deployment", "StatefulSet"):
        for workload in by_kind.get(kind, {}).values():
            pod = workload["spec"]["template"]["spec"]
            for container in [*pod.get("initContainers", []), *pod["containers"]]:
                for entry in container.get("env", []):
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        read.add((ref["name"], ref["key"]))
    created = set()
    command = re.compile(r"kubectl create secret generic ([\w.-]+)((?:[^\n]*\\\n)*[^\n]*)")
    for match in command.finditer(DEPLOY_DOC.read_text()):
        created |= {(match[1], key)
                    for key in re.findall(r"--from-literal=([\w.-]+)=", match[2])}
    assert {"dora-gateway-keys", "dora-gateway-s3"} <= {name for name, _ in read}
    assert read <= created, f"docs/deploy.md never creates {sorted(read - created)}"


def test_compose_gateway_and_vllm_share_no_volume():
    """Not with each other, and not between a service's replicas: each container's /data is
    its own (anonymous) volume, which holds its cache."""
    services = compose_services()
    named = {name: {source for source, _, _ in compose_mounts(services[name])
                    if source and not source.startswith((".", "/"))}
             for name in ("gateway", "vllm")}
    assert not named["gateway"] & named["vllm"], named
    for name in ("gateway", "vllm"):
        service = services[name]
        if service.get("deploy", {}).get("replicas", 1) > 1:
            shared = [(source, target) for source, target, mode in compose_mounts(service)
                      if source and mode != "ro"]
            assert not shared, f"{name}'s replicas would share {shared}"
    caches = {"gateway": gateway_store((DEPLOY / "gateway.compose.toml").read_text())
              .get("cache_dir"),
              "vllm": services["vllm"]["environment"].get("DORA_GATEWAY_CACHE_DIR")}
    for name, directory in caches.items():
        assert directory, f"{name}: no cache directory given"
        own = [target for source, target, _ in compose_mounts(services[name]) if source is None]
        own += services[name].get("tmpfs", [])
        assert any(Path(directory).is_relative_to(target) for target in own), (
            f"{name}'s cache {directory} is not on a volume of its own")


def test_compose_runs_minio_with_the_bucket_and_keys_gateway_and_vllm_use():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    minio, job = services["minio"], services["minio-bucket"]
    for service in (minio, job):
        tag = service["image"].rpartition(":")[2]
        assert re.fullmatch(r"RELEASE\.[\dTZ-]+", tag), f"{service['image']}: not pinned"
    assert minio["healthcheck"]["test"]
    assert [source for source, _, _ in compose_mounts(minio)] == ["minio-data"]
    assert "minio-data" in compose["volumes"]
    assert job["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "restart" not in job, "a one-shot job restarted would never complete"
    # `mc mb ALIAS/BUCKET`, the alias from MC_HOST_<alias>
    assert job["command"][0] == "mb", job["command"]
    [target] = [arg for arg in job["command"][1:] if not arg.startswith("-")]
    alias, _, bucket = target.partition("/")
    store_url = gateway_store((DEPLOY / "gateway.compose.toml").read_text())["url"]
    assert bucket == urlsplit(store_url).netloc, f"the job creates {bucket}, not {store_url}"
    mc_host = urlsplit(job["environment"][f"MC_HOST_{alias}"])
    minio_env = minio["environment"]
    keys = {"AWS_ACCESS_KEY_ID": compose_variables(minio_env["MINIO_ROOT_USER"]),
            "AWS_SECRET_ACCESS_KEY": compose_variables(minio_env["MINIO_ROOT_PASSWORD"])}
    assert [compose_variables(mc_host.username), compose_variables(mc_host.password)] == list(
        keys.values())
    assert mc_host.hostname == "minio" and str(mc_host.port) in minio["expose"]
    for name in ("gateway", "vllm"):
        service = services[name]
        environment = service["environment"]
        assert service["depends_on"]["minio-bucket"]["condition"] == (
            "service_completed_successfully"), name
        endpoint = urlsplit(compose_endpoint(environment))
        assert (endpoint.scheme, endpoint.hostname, endpoint.port) == (
            mc_host.scheme, mc_host.hostname, mc_host.port), f"{name} reaches another store"
        assert environment["AWS_REGION"], name
        for variable, expected in keys.items():
            assert compose_variables(environment[variable]) == expected, f"{name}: {variable}"


def test_docs_env_file_sets_every_variable_compose_requires():
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    doc = DEPLOY_DOC.read_text()
    env_file = re.search(r"cat > \.env <<'EOF'.*?\n(.*?)\nEOF\n", doc, re.DOTALL)
    assert env_file, "docs/deploy.md shows no deploy/.env"
    given = set(re.findall(r"^(\w+)=", env_file[1], re.MULTILINE))
    assert {"S3_ACCESS_KEY_ID", "POSTGRES_PASSWORD"} <= required
    assert required <= given, f"docs/deploy.md's .env lacks {sorted(required - given)}"


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
