"""The gateway's configuration: one TOML file, checked completely before anything starts.

Every problem in the file is collected into one `ConfigError`, so an operator fixes them all
in one go. Relative paths are relative to the config file, so a config is portable with the
directory it sits in. API keys are reduced to sha256 digests here; plain keys never outlive
loading.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from adapters import paths
from adapters.errors import ProblemsError, SourceError
from adapters.object_store import S3Url
from gateway.names import NAME_PATTERN, valid_name
from gateway.quota.policy import MAX_LIMIT, BudgetPeriod, TenantLimits
from gateway.tenancy.keys import parse_key, parse_secret
from gateway.tenancy.tenants import ALL_ADAPTERS, Tenant
from gateway.upstream.discovery import is_dns_backend
from gateway.upstream.routing import DEFAULT_LOAD_FACTOR, POLICIES

SECTIONS = {"model", "server", "engine", "adapters", "registry", "store", "admin", "metrics",
            "tenants", "routing", "limits"}
LIMITS_FAIL = ("open", "closed")
LIMITS_STORE_SCHEMES = ("redis", "rediss")
METRICS_ACCESS = ("local", "key", "open")
REGISTRY_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgres")
DTYPES = {"auto", "half", "float16", "bfloat16", "float", "float32"}
# vLLM 0.32's --max-lora-rank choices: any other value makes vLLM exit at start.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_CONCURRENCY = 4
DEFAULT_MAX_TOKENS = 1024
LIMIT_KEYS = ("requests_per_minute", "tokens_per_minute", "token_budget", "budget_period")
T = TypeVar("T")


class ConfigError(ProblemsError):
    """A config file that cannot be used (`source`: the file)."""

    def __init__(self, source: Path, problems: list[str]) -> None:
        self.source = source
        super().__init__(f"config {source}", problems)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 1 << 20
    # On SIGTERM: how long requests in flight may run on while new ones get 503.
    shutdown_grace_seconds: int = 30
    # How long one write to a stream's client may wait (a client that stopped reading).
    stream_write_timeout_seconds: int = 30
    cache_salt_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)


@dataclass(frozen=True)
class EngineConfig:
    """`[engine]`: the vLLM engines behind the gateway. Without `backends`, the flags of the
    local engine the gateway starts; with them, the URLs of external vLLM servers that replace
    it, and `max_lora_rank` is taken to be their `--max-lora-rank`."""

    dtype: str = "float32"
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int = 32
    compile: bool = True
    extra_args: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoutingConfig:
    """`[routing]`: how requests are spread over the replicas (`gateway.upstream.routing`)."""

    policy: str = POLICIES[0]
    load_factor: float = DEFAULT_LOAD_FACTOR


@dataclass(frozen=True)
class AdaptersConfig:
    dir: Path
    roots: tuple[Path, ...]
    eager: bool = False
    max_upload_bytes: int = 512 << 20


@dataclass(frozen=True)
class RegistryConfig:
    """`[registry]`: the durable registry's database. SQLite (the default, one file under
    `$DORA_GATEWAY_HOME`) for one gateway; PostgreSQL for replicas that share it."""

    url: str = field(repr=False)


@dataclass(frozen=True)
class StoreConfig:
    """`[store]`: where compiled artifacts and kept adapters live. No `url`: directories under
    `$DORA_GATEWAY_HOME` that the gateways and vLLM share; `s3://bucket/prefix`: an
    S3-compatible store (endpoint and credentials from the standard AWS environment and
    config files, never from this file), fetched into `cache_dir` (bounded by
    `cache_max_bytes`) where needed."""

    url: str = ""
    cache_dir: Path = field(default_factory=lambda: paths.home() / "cache")
    cache_max_bytes: int = 10 << 30


@dataclass(frozen=True)
class LimitsConfig:
    """`[limits]`: where the tenants' rate-limit counters live. No `store`: in this gateway's
    memory (one gateway); `redis://host:port/db`: one Redis that every replica shares, so a
    tenant has one limit, not one per replica. `fail`: what happens to requests of limited
    tenants while the store is unreachable: "open" lets them through unlimited, "closed"
    refuses them with 503."""

    store: str = field(default="", repr=False)
    fail: str = "open"


def default_registry_url() -> str:
    return f"sqlite:///{paths.home() / 'registry.sqlite3'}"


@dataclass(frozen=True)
class MetricsConfig:
    """Who may read `/metrics` and `/dashboard`: "local" lets loopback clients in without a
    key, "key" asks everyone for a metrics (or admin) key, "open" asks no one."""

    access: str = "local"
    key_digests: tuple[bytes, ...] = field(default=(), repr=False)
    window_seconds: int = 300


@dataclass(frozen=True)
class GatewayConfig:
    source: Path
    model_path: Path
    server: ServerConfig
    engine: EngineConfig
    adapters: AdaptersConfig
    admin_key_digests: tuple[bytes, ...] = field(repr=False)
    tenants: tuple[Tenant, ...]
    metrics: MetricsConfig = MetricsConfig()
    registry: RegistryConfig = field(default_factory=lambda: RegistryConfig(
        default_registry_url()))
    routing: RoutingConfig = RoutingConfig()
    store: StoreConfig = field(default_factory=StoreConfig)
    limits: LimitsConfig = LimitsConfig()


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    source = Path(path).absolute()
    try:
        data = tomllib.loads(source.read_text())
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from exc
    reader = _Reader(source.parent, os.environ if environ is None else environ)
    config = reader.config(data, source)
    if reader.problems:
        raise ConfigError(source, reader.problems)
    return config


class _Reader:
    """Reads tables, recording a problem (and using the default) for each bad value."""

    def __init__(self, base_dir: Path, environ: Mapping[str, str]) -> None:
        self.base_dir = base_dir
        self.environ = environ
        self.problems: list[str] = []
        self._key_owners: dict[bytes, str] = {}

    def config(self, data: dict, source: Path) -> GatewayConfig:
        self._known(data, SECTIONS, "the file")
        model = self.table(data, "model", {"path"})
        server = self.table(data, "server", {"host", "port", "max_body_bytes",
                                             "shutdown_grace_seconds",
                                             "stream_write_timeout_seconds",
                                             "cache_salt_secret"})
        engine = self.table(data, "engine", {"dtype", "max_loras", "max_lora_rank",
                                             "max_cpu_loras", "compile", "extra_args",
                                             "backends"})
        adapters = self.table(data, "adapters", {"dir", "roots", "eager", "max_upload_bytes"})
        registry = self.table(data, "registry", {"url"})
        store = self.table(data, "store", {"url", "cache_dir", "cache_max_bytes"})
        admin = self.table(data, "admin", {"api_keys"})
        metrics = self.table(data, "metrics", {"access", "api_keys", "window_seconds"})
        routing = self.table(data, "routing", {"policy", "load_factor"})
        limits = self.table(data, "limits", {"store", "fail"})
        return GatewayConfig(
            source=source,
            model_path=self.path(model, "model", "path", paths.default_model_dir()),
            server=self.server(server),
            engine=self.engine(engine),
            adapters=self.adapters(adapters),
            admin_key_digests=self.keys(admin, "admin", "admin", required=False),
            tenants=self.tenants(data.get("tenants", {})),
            metrics=self.metrics(metrics),
            registry=self.registry(registry),
            routing=self.routing(routing),
            store=self.store(store),
            limits=self.limits(limits),
        )

    def server(self, table: dict) -> ServerConfig:
        defaults = ServerConfig()
        secret = self.value(table, "server", "cache_salt_secret", str, None)
        return ServerConfig(
            host=self.value(table, "server", "host", str, defaults.host),
            port=self.integer(table, "server", "port", defaults.port, maximum=65535),
            max_body_bytes=self.integer(table, "server", "max_body_bytes",
                                        defaults.max_body_bytes),
            shutdown_grace_seconds=self.integer(table, "server", "shutdown_grace_seconds",
                                                defaults.shutdown_grace_seconds, minimum=0),
            stream_write_timeout_seconds=self.integer(
                table, "server", "stream_write_timeout_seconds",
                defaults.stream_write_timeout_seconds),
            cache_salt_secret=(self.secret(secret, "server.cache_salt_secret") if secret
                               else defaults.cache_salt_secret),
        )

    def engine(self, table: dict) -> EngineConfig:
        defaults = EngineConfig()
        dtype = self.value(table, "engine", "dtype", str, defaults.dtype)
        if dtype not in DTYPES:
            self.problems.append(f"engine.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
        max_lora_rank = self.integer(table, "engine", "max_lora_rank", defaults.max_lora_rank)
        if max_lora_rank not in LORA_RANKS:
            self.problems.append(f"engine.max_lora_rank: {max_lora_rank} is not one of vLLM's "
                                 f"ranks {list(LORA_RANKS)}")
        backends = self.strings(table, "engine", "backends")
        for url in backends:
            if not is_backend_url(url):
                self.problems.append(f"engine.backends: {url!r} is not an http(s) URL or a "
                                     f"dns+http(s)://NAME:PORT name")
        return EngineConfig(
            dtype=dtype,
            max_loras=self.integer(table, "engine", "max_loras", defaults.max_loras),
            max_lora_rank=max_lora_rank,
            max_cpu_loras=self.integer(table, "engine", "max_cpu_loras", defaults.max_cpu_loras),
            compile=self.value(table, "engine", "compile", bool, defaults.compile),
            extra_args=self.strings(table, "engine", "extra_args"),
            backends=tuple(url.rstrip("/") for url in backends),
        )

    def adapters(self, table: dict) -> AdaptersConfig:
        directory = self.path(table, "adapters", "dir", paths.demo_adapters_dir())
        roots = [directory, *(self.resolve(root) for root in self.strings(table, "adapters",
                                                                         "roots"))]
        for root in roots:
            if not root.is_dir():
                self.problems.append(f"adapters: {root} is not a directory")
        return AdaptersConfig(
            dir=directory,
            roots=tuple(dict.fromkeys(roots)),
            eager=self.value(table, "adapters", "eager", bool, False),
            max_upload_bytes=self.integer(table, "adapters", "max_upload_bytes",
                                          AdaptersConfig.max_upload_bytes),
        )

    def routing(self, table: dict) -> RoutingConfig:
        defaults = RoutingConfig()
        policy = self.value(table, "routing", "policy", str, defaults.policy)
        if policy not in POLICIES:
            self.problems.append(f"routing.policy: {policy!r} is not one of {list(POLICIES)}")
        load_factor = table.get("load_factor", defaults.load_factor)
        if isinstance(load_factor, bool) or not isinstance(load_factor, int | float):
            self.problems.append("routing.load_factor: must be a number")
            load_factor = defaults.load_factor
        elif load_factor < 1:
            self.problems.append(f"routing.load_factor: must be at least 1, got {load_factor}")
            load_factor = defaults.load_factor
        return RoutingConfig(policy=policy, load_factor=float(load_factor))

    def registry(self, table: dict) -> RegistryConfig:
        """`url`: plain or `env:VAR`; a relative SQLite path is relative to the file."""
        spec = self.value(table, "registry", "url", str, None)
        if not spec:
            return RegistryConfig(default_registry_url())
        url, problem = parse_secret(spec, self.environ)
        scheme, separator, rest = url.partition("://")
        if problem:
            self.problems.append(f"registry.url: {problem}")
        elif not separator or scheme not in REGISTRY_SCHEMES:
            self.problems.append("registry.url: must be sqlite:///PATH or "
                                 "postgresql://USER:PASSWORD@HOST/DATABASE")
        elif scheme == "sqlite" and rest.startswith("/") and rest != "/":
            url = f"sqlite:///{self.resolve(rest[1:])}"
        elif scheme == "sqlite":
            self.problems.append("registry.url: a SQLite url needs a file: sqlite:///PATH")
        return RegistryConfig(url)

    def store(self, table: dict) -> StoreConfig:
        defaults = StoreConfig()
        url = self.value(table, "store", "url", str, defaults.url)
        if url:
            try:
                S3Url.parse(url)
            except SourceError as exc:
                self.problems.append(f"store.url: {exc.detail} (use s3://BUCKET/PREFIX, or no "
                                     f"url for local directories)")
        return StoreConfig(
            url=url.rstrip("/"),
            cache_dir=self.path(table, "store", "cache_dir", defaults.cache_dir),
            cache_max_bytes=self.integer(table, "store", "cache_max_bytes",
                                         defaults.cache_max_bytes),
        )

    def limits(self, table: dict) -> LimitsConfig:
        """`store`: plain or `env:VAR` (a Redis URL may hold a password)."""
        defaults = LimitsConfig()
        store, problem = parse_secret(self.value(table, "limits", "store", str, defaults.store),
                                      self.environ)
        if problem:
            self.problems.append(f"limits.store: {problem}")
        elif store and store.partition("://")[0] not in LIMITS_STORE_SCHEMES:
            self.problems.append("limits.store: must be a redis:// or rediss:// URL (or absent "
                                 "for counters in this gateway's memory)")
        fail = self.value(table, "limits", "fail", str, defaults.fail)
        if fail not in LIMITS_FAIL:
            self.problems.append(f"limits.fail: {fail!r} is not one of {list(LIMITS_FAIL)}")
        return LimitsConfig(store=store, fail=fail)

    def metrics(self, table: dict) -> MetricsConfig:
        defaults = MetricsConfig()
        access = self.value(table, "metrics", "access", str, defaults.access)
        if access not in METRICS_ACCESS:
            self.problems.append(f"metrics.access: {access!r} is not one of {list(METRICS_ACCESS)}")
        return MetricsConfig(
            access=access,
            key_digests=self.keys(table, "metrics", "metrics", required=False),
            window_seconds=self.integer(table, "metrics", "window_seconds",
                                        defaults.window_seconds, maximum=86400),
        )

    def tenants(self, tables: object) -> tuple[Tenant, ...]:
        if not isinstance(tables, dict) or not tables:
            self.problems.append("tenants: at least one [tenants.NAME] table is required")
            return ()
        tenants = []
        for name in tables:
            where = f"tenants.{name}"
            if not valid_name(name):
                self.problems.append(f"{where}: the name must match {NAME_PATTERN}")
            table = self.table(tables, name, {"api_keys", "adapters", "max_concurrency",
                                              "max_tokens", *LIMIT_KEYS}, where=where)
            adapters = self.strings(table, where, "adapters")
            for adapter in adapters:
                if adapter != ALL_ADAPTERS and not valid_name(adapter):
                    self.problems.append(f"{where}.adapters: {adapter!r} must be \"*\" or "
                                         f"match {NAME_PATTERN}")
            tenants.append(Tenant(
                name=name,
                key_digests=self.keys(table, where, f"tenant {name!r}", required=True),
                adapters=frozenset(adapters),
                max_concurrency=self.integer(table, where, "max_concurrency",
                                             DEFAULT_MAX_CONCURRENCY),
                max_tokens=self.integer(table, where, "max_tokens", DEFAULT_MAX_TOKENS),
                limits=self.tenant_limits(table, where),
            ))
        return tuple(tenants)

    def tenant_limits(self, table: dict, where: str) -> TenantLimits:
        def optional(key: str) -> int | None:
            """A positive integer, or None when absent (or wrong: the problem is recorded)."""
            if key not in table:
                return None
            value = self.value(table, where, key, int, None)
            if value is not None and not 1 <= value <= MAX_LIMIT:
                self.problems.append(f"{where}.{key}: must be between 1 and {MAX_LIMIT}, "
                                     f"got {value}")
                return None
            return value

        period = self.value(table, where, "budget_period", str, str(BudgetPeriod.DAY))
        if period not in tuple(BudgetPeriod):
            self.problems.append(f"{where}.budget_period: {period!r} is not one of "
                                 f"{[str(p) for p in BudgetPeriod]}")
            period = BudgetPeriod.DAY
        return TenantLimits(optional("requests_per_minute"), optional("tokens_per_minute"),
                            optional("token_budget"), BudgetPeriod(period))

    def keys(self, table: dict, where: str, owner: str, *, required: bool) -> tuple[bytes, ...]:
        specs = self.strings(table, where, "api_keys")
        if required and not specs:
            self.problems.append(f"{where}.api_keys: at least one key is required")
        digests = []
        for index, spec in enumerate(specs):
            digest, problem = parse_key(spec, self.environ)
            if problem:
                self.problems.append(f"{where}.api_keys[{index}]: {problem}")
                continue
            if digest in self._key_owners:
                self.problems.append(f"{where}.api_keys[{index}]: the same key is already "
                                     f"given for {self._key_owners[digest]}")
            self._key_owners[digest] = owner
            digests.append(digest)
        return tuple(digests)

    def secret(self, spec: str, where: str) -> bytes:
        secret, problem = parse_secret(spec, self.environ)
        if problem:
            self.problems.append(f"{where}: {problem}")
        return secret.encode()

    def table(self, data: dict, name: str, allowed: set[str], where: str | None = None) -> dict:
        where = where or name
        table = data.get(name, {})
        if not isinstance(table, dict):
            self.problems.append(f"{where}: must be a table")
            return {}
        self._known(table, allowed, where)
        return table

    def value(self, table: dict, where: str, key: str, kind: type[T], default: T) -> T:
        value = table.get(key, default)
        if value is default:
            return value
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            self.problems.append(f"{where}.{key}: must be {_KIND_NAMES[kind]}, "
                                 f"got {_KIND_NAMES.get(type(value), type(value).__name__)}")
            return default
        return value

    def integer(self, table: dict, where: str, key: str, default: int, *, minimum: int = 1,
                maximum: int | None = None) -> int:
        value = self.value(table, where, key, int, default)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum else f"at least {minimum}"
            self.problems.append(f"{where}.{key}: must be {bound}, got {value}")
            return default
        return value

    def strings(self, table: dict, where: str, key: str) -> tuple[str, ...]:
        values = self.value(table, where, key, list, [])
        if not all(isinstance(value, str) for value in values):
            self.problems.append(f"{where}.{key}: must be a list of strings")
            return ()
        return tuple(values)

    def path(self, table: dict, where: str, key: str, default: Path) -> Path:
        value = self.value(table, where, key, str, None)
        return self.resolve(value) if value else default

    def resolve(self, value: str) -> Path:
        return Path(os.path.abspath(self.base_dir / Path(value).expanduser()))

    def _known(self, table: dict, allowed: set[str], where: str) -> None:
        for key in sorted(set(table) - allowed):
            self.problems.append(f"{where}: unknown key {key!r} (known: {sorted(allowed)})")


def is_backend_url(url: str) -> bool:
    """An http(s) URL of one replica, or a DNS name standing for several."""
    return is_http_url(url) or is_dns_backend(url)


def is_http_url(url: str) -> bool:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


_KIND_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "a list",
               float: "a float", dict: "a table"}
