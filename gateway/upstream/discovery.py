"""Replicas found by DNS: a backend given as `dns+http://NAME:PORT` stands for every address
NAME resolves to (a Kubernetes headless Service lists one per ready pod).

The resolver is a callable, so tests resolve a made-up name to loopback addresses. An answer
that fails (a DNS hiccup, or no ready pod at all) keeps the previous one: the health checks
still keep a replica that is gone out of the routing, and a hiccup does not empty the table.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import httpx

DNS_PREFIX = "dns+"
DEFAULT_PORTS = {"http": 80, "https": 443}

# (host, port) -> the addresses it resolves to
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]

log = logging.getLogger(__name__)


async def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the system resolver (DNS, /etc/hosts) gives for `host`, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class DnsName:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, spec: str) -> DnsName | None:
        """The name in `dns+http(s)://NAME[:PORT]`; None if `spec` is not one."""
        if not spec.startswith(DNS_PREFIX):
            return None
        try:
            url = httpx.URL(spec.removeprefix(DNS_PREFIX))
        except httpx.InvalidURL:
            return None
        if url.scheme not in DEFAULT_PORTS or not url.host or url.path not in ("", "/"):
            return None
        return cls(url.scheme, url.host, url.port or DEFAULT_PORTS[url.scheme])

    def url(self, address: str) -> str:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        return f"{self.scheme}://{host}:{self.port}"


def is_dns_backend(spec: str) -> bool:
    return DnsName.parse(spec) is not None


class Discovery:
    """The backend URLs that `names` stand for now."""

    def __init__(self, names: Iterable[DnsName], resolver: Resolver = system_resolver) -> None:
        self._names = tuple(dict.fromkeys(names))
        self._resolver = resolver
        self._last: dict[DnsName, tuple[str, ...]] = {}

    async def urls(self) -> set[str]:
        answers = await asyncio.gather(*(self._resolve(name) for name in self._names))
        return {url for answer in answers for url in answer}

    async def _resolve(self, name: DnsName) -> tuple[str, ...]:
        try:
            addresses = await self._resolver(name.host, name.port)
            self._last[name] = tuple(name.url(address) for address in addresses)
        except (OSError, ValueError) as exc:
            log.warning("resolving %s failed (keeping its %d replicas): %s", name.host,
                        len(self._last.get(name, ())), exc)
        return self._last.get(name, ())
