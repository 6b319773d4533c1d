"""The gateway config file, key forms and the tenancy primitives."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import gateway.tenancy.keys
from adapters import paths
from gateway.cli import main
from gateway.config import ConfigError, load_config
from gateway.errors import RateLimited
from gateway.tenancy.keys import KeyRing, bearer_key, key_digest
from gateway.tenancy.limits import ConcurrencyLimiter

KEY = "sk-acme-0123456789abcdef"


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "adapters").mkdir(exist_ok=True)
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


ADAPTERS = '[adapters]\ndir = "adapters"\n'
TENANT = f'[tenants.acme]\napi_keys = ["{KEY}"]\n'
MINIMAL = ADAPTERS + TENANT


def problems(tmp_path: Path, text: str, environ: dict | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ or {})
    assert str(tmp_path / "gateway.toml") in str(caught.value)
    return "\n".join(caught.value.problems)


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), {})
    assert config.model_path == paths.default_model_dir()
    assert config.adapters.dir == tmp_path / "adapters"
    assert config.adapters.roots == (tmp_path / "adapters",)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.max_body_bytes == 1 << 20
    assert config.engine.backends == ()
    assert config.admin_key_digests == ()
    (acme,) = config.tenants
    assert acme.name == "acme" and acme.adapters == frozenset()
    assert acme.key_digests == (hashlib.sha256(KEY.encode()).digest(),)


def test_full_config(tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "model").mkdir()
    config = load_config(write(tmp_path, f"""
[model]
path = "model"
[server]
host = "0.0.0.0"
port = 9000
max_body_bytes = 2048
cache_salt_secret = "env:SALT"
[engine]
dtype = "bfloat16"
max_loras = 2
max_lora_rank = 32
extra_args = ["--enforce-eager"]
backends = ["http://127.0.0.1:8000/", "http://10.0.0.2:8000"]
[adapters]
dir = "adapters"
roots = ["extra", "adapters"]
eager = true
[admin]
api_keys = ["env:ADMIN_KEY"]
[tenants.acme]
api_keys = ["{KEY}", "sha256:{'AB' * 32}"]
adapters = ["caps", "pirate"]
max_concurrency = 3
max_tokens = 100
[tenants.globex]
api_keys = ["env:GLOBEX_KEY"]
adapters = ["*"]
"""), {"SALT": "salty", "ADMIN_KEY": "admin-key-0123456789", "GLOBEX_KEY": "globex-key-0123456"})
    assert config.model_path == tmp_path / "model"
    assert config.server.port == 9000 and config.server.cache_salt_secret == b"salty"
    assert config.engine.backends == ("http://127.0.0.1:8000", "http://10.0.0.2:8000")
    assert config.engine.extra_args == ("--enforce-eager",)
    assert config.adapters.roots == (tmp_path / "adapters", tmp_path / "extra")
    assert config.adapters.eager is True
    assert config.admin_key_digests == (key_digest("admin-key-0123456789"),)
    acme, globex = config.tenants
    assert acme.key_digests == (key_digest(KEY), bytes.fromhex("ab" * 32))
    assert (acme.max_concurrency, acme.max_tokens) == (3, 100)
    assert acme.may_use("caps") and not acme.may_use("plain")
    assert globex.may_use("anything") and globex.key_digests == (key_digest("globex-key-0123456"),)


def test_secrets_do_not_appear_in_repr(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + '[server]\ncache_salt_secret = "s3cret"\n'), {})
    assert "s3cret" not in repr(config) and KEY not in repr(config)


def test_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    assert "not valid TOML" in problems(tmp_path, "[server\n")


@pytest.mark.parametrize(("text", "expected"), [
    ("[srever]\n", "the file: unknown key 'srever'"),
    ("[server]\nprot = 1\n", "server: unknown key 'prot'"),
    ('[server]\nport = "80"\n', "server.port: must be an integer, got a string"),
    ("[server]\nport = 70000\n", "server.port: must be between 1 and 65535"),
    ("[server]\nmax_body_bytes = 0\n", "server.max_body_bytes: must be at least 1"),
    ("[server]\nhost = true\n", "server.host: must be a string, got a boolean"),
    ('[server]\ncache_salt_secret = "env:NOPE"\n', "server.cache_salt_secret: environment"),
    ('[engine]\ndtype = "fp8"\n', "engine.dtype: 'fp8' is not one of"),
    ("[engine]\nmax_loras = true\n", "engine.max_loras: must be an integer, got a boolean"),
    ("[engine]\nmax_lora_rank = 10\n", "engine.max_lora_rank: 10 is not one of vLLM's ranks"),
    ('[engine]\nbackends = ["localhost:8000"]\n', "'localhost:8000' is not an http(s) URL"),
    ('[engine]\nbackends = ["ftp://x"]\n', "'ftp://x' is not an http(s) URL"),
    ('[engine]\nbackends = ["http://[::1"]\n', "'http://[::1' is not an http(s) URL"),
    ("[engine]\nextra_args = [1]\n", "engine.extra_args: must be a list of strings"),
    ('[adapters]\ndir = "adapters"\nroots = ["nowhere"]\n', "nowhere is not a directory"),
    ('[adapters]\ndir = "adapters"\neager = "yes"\n', "adapters.eager: must be a boolean"),
    ('model = "x"\n', "model: must be a table"),
])
def test_every_invalid_value_is_reported(tmp_path, text, expected):
    sections = text if "[adapters]" in text else text + ADAPTERS
    assert expected in problems(tmp_path, sections + TENANT)


def test_adapters_dir_must_exist(tmp_path):
    assert "missing-dir is not a directory" in problems(
        tmp_path, MINIMAL.replace('dir = "adapters"', 'dir = "missing-dir"'))


@pytest.mark.parametrize(("tenant", "expected"), [
    ('[tenants.acme]\nadapters = ["caps"]\n', "tenants.acme.api_keys: at least one key"),
    ('[tenants.acme]\napi_keys = ["short"]\n', "api_keys[0]: a key must have at least 16"),
    ('[tenants.acme]\napi_keys = ["sha256:abc"]\n', "api_keys[0]: a sha256: key must be"),
    ('[tenants.acme]\napi_keys = ["env:ACME"]\n', "environment variable 'ACME' is not set"),
    ('[tenants.acme]\napi_keys = "sk-acme-0123456789abcdef"\n', "api_keys: must be a list"),
    (f'[tenants."a/b"]\napi_keys = ["{KEY}"]\n', "tenants.a/b: the name must match"),
    (f'[tenants.acme]\napi_keys = ["{KEY}"]\nadapters = ["../x"]\n', "'../x' must be \"*\""),
    (f'[tenants.acme]\napi_keys = ["{KEY}"]\nmax_tokens = 0\n', "max_tokens: must be at least"),
    (f'[tenants.acme]\napi_keys = ["{KEY}"]\nquota = 1\n', "tenants.acme: unknown key 'quota'"),
    ("", "at least one [tenants.NAME] table is required"),
])
def test_tenant_problems(tmp_path, tenant, expected):
    assert expected in problems(tmp_path, '[adapters]\ndir = "adapters"\n' + tenant)


def test_a_key_given_twice_is_refused(tmp_path):
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    text = MINIMAL + f'[admin]\napi_keys = ["sha256:{digest}"]\n'
    assert "tenants.acme.api_keys[0]: the same key is already given for admin" in problems(
        tmp_path, text)


def test_all_problems_come_in_one_error(tmp_path):
    found = problems(tmp_path, '[server]\nport = 0\n[engine]\ndtype = "x"\n' + MINIMAL)
    assert "server.port" in found and "engine.dtype" in found


def test_key_ring_compares_every_digest_without_early_exit(monkeypatch):
    ring = KeyRing([(key_digest(f"key-{index}"), index) for index in range(5)])
    calls = []
    real = gateway.tenancy.keys.hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(gateway.tenancy.keys.hmac, "compare_digest", counting)
    assert ring.lookup("key-0") == 0
    assert ring.lookup("key-4") == 4
    assert ring.lookup("nope") is None
    assert ring.lookup(None) is None
    assert len(calls) == 15


@pytest.mark.parametrize(("header", "expected"), [
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer ", None),
    (None, None), ("abc", None),
])
def test_bearer_key(header, expected):
    assert bearer_key(header) == expected


def test_concurrency_limiter_refuses_over_the_limit_and_releases_once():
    limiter = ConcurrencyLimiter("acme", 2)
    first, second = limiter.acquire(), limiter.acquire()
    with pytest.raises(RateLimited) as caught:
        limiter.acquire()
    assert caught.value.status == 429 and caught.value.headers == {"Retry-After": "1"}
    first.release()
    first.release()
    assert limiter.in_flight == 1
    limiter.acquire()
    second.release()
    assert limiter.in_flight == 1


def test_serve_reports_a_bad_config_and_exits_1(tmp_path, capsys):
    assert main(["serve", "--config", str(write(tmp_path, "[server]\nport = 0\n" + MINIMAL))]) == 1
    assert "server.port: must be between 1 and 65535" in capsys.readouterr().err


def test_the_example_config_is_valid():
    example = Path(__file__).resolve().parent.parent / "gateway" / "example-config.toml"
    config = load_config(example, {"DORA_GATEWAY_SALT": "salt", "ACME_API_KEY": KEY,
                                   "DORA_GATEWAY_ADMIN_KEY": "admin-0123456789abcdef",
                                   "DORA_GATEWAY_METRICS_KEY": "metrics-0123456789abcdef"})
    assert config.adapters.dir == paths.demo_adapters_dir()
    assert (config.metrics.access, len(config.metrics.key_digests)) == ("local", 1)
    assert [tenant.name for tenant in config.tenants] == ["acme", "globex"]


def test_metrics_defaults_and_every_bad_value_reported(tmp_path):
    assert load_config(write(tmp_path, MINIMAL)).metrics.access == "local"
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, '[metrics]\naccess = "public"\nwindow_seconds = 0\n'
                                    'api_keys = ["short"]\n' + MINIMAL))
    problems = "\n".join(error.value.problems)
    assert "metrics.access: 'public' is not one of ['local', 'key', 'open']" in problems
    assert "metrics.window_seconds: must be between 1 and 86400" in problems
    assert "metrics.api_keys[0]" in problems


def test_the_local_engine_compiles_by_default_and_keeps_32_adapters_loaded(tmp_path):
    engine = load_config(write(tmp_path, MINIMAL), {}).engine
    assert engine.compile is True and engine.max_cpu_loras == 32
    engine = load_config(write(tmp_path, MINIMAL + "[engine]\ncompile = false\n"
                                                   "max_cpu_loras = 8\n"), {}).engine
    assert engine.compile is False and engine.max_cpu_loras == 8
    assert "engine.compile" in problems(tmp_path, MINIMAL + '[engine]\ncompile = "yes"\n')


def test_the_registry_defaults_to_sqlite_under_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DORA_GATEWAY_HOME", str(tmp_path / "home"))
    config = load_config(write(tmp_path, MINIMAL), {})
    assert config.registry.url == f"sqlite:///{tmp_path / 'home' / 'registry.sqlite3'}"
    assert "sqlite" not in repr(config.registry)


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:///registry.db", "sqlite:///{tmp}/registry.db"),
    ("sqlite:////var/lib/registry.db", "sqlite:////var/lib/registry.db"),
    ("postgresql://dora:pw@db:5432/dora", "postgresql://dora:pw@db:5432/dora"),
    ("env:REGISTRY_URL", "postgresql://dora:from-env@db/dora"),
])
def test_registry_url_spellings(tmp_path, url, expected):
    environ = {"REGISTRY_URL": "postgresql://dora:from-env@db/dora"}
    config = load_config(write(tmp_path, MINIMAL + f'[registry]\nurl = "{url}"\n'), environ)
    assert config.registry.url == expected.format(tmp=tmp_path)


@pytest.mark.parametrize(("url", "message"), [
    ("mysql://db/dora", "registry.url: must be sqlite:///PATH or postgresql://"),
    ("db.example.com", "registry.url: must be sqlite:///PATH or postgresql://"),
    ("sqlite://", "registry.url: a SQLite url needs a file"),
    ("env:NOT_SET", "registry.url: environment variable 'NOT_SET' is not set or empty"),
])
def test_bad_registry_urls_are_reported(tmp_path, url, message):
    assert message in problems(tmp_path, MINIMAL + f'[registry]\nurl = "{url}"\n')


def test_routing_defaults_to_adapter_affinity_and_backends_may_be_dns_names(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + """
[engine]
backends = ["dns+http://vllm-headless.ns.svc:8000", "http://10.0.0.9:8000"]
"""), {})
    assert config.engine.backends == ("dns+http://vllm-headless.ns.svc:8000",
                                      "http://10.0.0.9:8000")
    assert (config.routing.policy, config.routing.load_factor) == ("adapter-affinity", 1.25)
    config = load_config(write(tmp_path, MINIMAL + """
[routing]
policy = "round-robin"
load_factor = 2
"""), {})
    assert (config.routing.policy, config.routing.load_factor) == ("round-robin", 2.0)


def test_bad_routing_and_backend_names_are_reported(tmp_path):
    found = problems(tmp_path, MINIMAL + """
[engine]
backends = ["dns+ftp://vllm:8000", "dns+http://vllm:8000/v1"]
[routing]
policy = "random"
load_factor = 0.5
""")
    assert "'dns+ftp://vllm:8000' is not an http(s) URL or a dns+http(s)://NAME:PORT" in found
    assert "'dns+http://vllm:8000/v1' is not" in found
    assert "routing.policy: 'random' is not one of ['adapter-affinity', 'round-robin']" in found
    assert "routing.load_factor: must be at least 1, got 0.5" in found


def test_limits_per_tenant_and_the_counter_store(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + 'requests_per_minute = 60\n'
                               'tokens_per_minute = 40000\ntoken_budget = 1000000\n'
                               'budget_period = "month"\n'
                               '[limits]\nstore = "env:LIMITS_URL"\nfail = "closed"\n'),
                         {"LIMITS_URL": "redis://:pw@redis.internal:6379/0"})
    (acme,) = config.tenants
    assert (acme.limits.requests_per_minute, acme.limits.tokens_per_minute,
            acme.limits.token_budget, acme.limits.budget_period) == (60, 40000, 1000000, "month")
    assert (config.limits.store, config.limits.fail) == ("redis://:pw@redis.internal:6379/0",
                                                         "closed")
    default = load_config(write(tmp_path, MINIMAL), {})
    assert not default.tenants[0].limits.any
    assert (default.limits.store, default.limits.fail) == ("", "open")


def test_every_bad_limit_is_reported_at_once(tmp_path):
    found = problems(tmp_path, MINIMAL + 'requests_per_minute = 0\ntokens_per_minute = "many"\n'
                     'token_budget = -5\nbudget_period = "week"\n'
                     '[limits]\nstore = "memcached://x"\nfail = "maybe"\n')
    assert "tenants.acme.requests_per_minute: must be between 1 and 9007199254740992, got 0" \
        in found
    assert "tenants.acme.tokens_per_minute: must be an integer, got a string" in found
    assert "tenants.acme.token_budget: must be between 1 and 9007199254740992, got -5" in found
    assert "tenants.acme.budget_period: 'week' is not one of ['day', 'month']" in found
    assert "limits.store: must be a redis:// or rediss:// URL" in found
    assert "limits.fail: 'maybe' is not one of ['open', 'closed']" in found
    assert "limits.store: environment variable 'NOPE' is not set or empty" in problems(
        tmp_path, MINIMAL + '[limits]\nstore = "env:NOPE"\n')
