"""Where the project keeps its files by default: under `$DORA_GATEWAY_HOME`."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """`$DORA_GATEWAY_HOME`, or `~/.cache/dora-gateway` (outside any clone, so CI reuses it)."""
    configured = os.environ.get("DORA_GATEWAY_HOME")
    return Path(configured) if configured else Path.home() / ".cache" / "dora-gateway"


def default_model_dir() -> Path:
    return home() / "models" / "SmolLM2-135M-Instruct"


def compiled_store_dir() -> Path:
    return home() / "compiled"


def uploads_dir() -> Path:
    """Uploaded adapters, by content hash: beside the compiled store, on the same (shared)
    volume."""
    return home() / "uploads"


def demo_adapters_dir() -> Path:
    """The committed demo adapters, one PEFT directory each."""
    return Path(__file__).resolve().parent / "demo"
