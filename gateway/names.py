"""The names clients use: adapter and tenant names, and the base model's name.

Adapter and tenant names follow one rule, written here once (as a pattern for config errors
and in words for API errors): safe as a directory name and in a URL path.
"""

from __future__ import annotations

import re

# What clients send as `model` for the base model; never an adapter's name.
BASE_MODEL = "base"
NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME = re.compile(NAME_PATTERN)


def valid_name(name: object) -> bool:
    """Whether `name` follows the rule (fullmatch, as `$` would accept a trailing newline)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None
