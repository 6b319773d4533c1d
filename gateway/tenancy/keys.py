"""How API keys and secrets are written in the config: plain, `sha256:<hex>` or `env:VAR`.

`sha256:` lets a config hold no usable key at all, and `env:` keeps secrets in the
environment (a container secret); either way only the digest is kept after loading.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gateway.tenancy.tenants import key_digest

MIN_KEY_CHARS = 16
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def parse_secret(spec: str, environ: Mapping[str, str]) -> tuple[str, str | None]:
    """(secret, problem): `env:VAR` reads the environment, anything else is the secret."""
    if not spec.startswith("env:"):
        return spec, None
    variable = spec[len("env:"):]
    value = environ.get(variable, "")
    if not value:
        return "", f"environment variable {variable!r} is not set or empty"
    return value, None


def parse_key(spec: str, environ: Mapping[str, str]) -> tuple[bytes, str | None]:
    """(sha256 digest, problem) of a key given plain, as `sha256:<hex>` or as `env:VAR`."""
    if spec.startswith("sha256:"):
        hex_digest = spec[len("sha256:"):]
        if SHA256_HEX.fullmatch(hex_digest) is None:
            return b"", "a sha256: key must be followed by 64 hex digits"
        return bytes.fromhex(hex_digest), None
    key, problem = parse_secret(spec, environ)
    if problem:
        return b"", problem
    if len(key) < MIN_KEY_CHARS:
        return b"", f"a key must have at least {MIN_KEY_CHARS} characters"
    return key_digest(key), None
