"""What the configured vLLM engines accept, read from the gateway's config.

vLLM publishes none of its LoRA limits over HTTP (`/v1/models` and `/metrics` carry neither
`--max-lora-rank` nor `--fully-sharded-loras`), so they come from the config: for the local
vLLM the gateway knows exactly how it started it; external backends are taken to run with
`[engine] max_lora_rank`, which the operator keeps equal to their `--max-lora-rank`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import EngineConfig

VLLM_DEFAULT_MAX_LORA_RANK = 16


@dataclass(frozen=True)
class EngineLimits:
    """`source` says where the figures came from, for refusal messages."""

    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK
    fully_sharded_loras: bool = False
    quantization: str | None = None
    source: str = "vLLM's default"

    @classmethod
    def from_config(cls, engine: EngineConfig) -> EngineLimits:
        if engine.backends:
            return cls(engine.max_lora_rank,
                       source="[engine] max_lora_rank, taken to be the backends' "
                              "--max-lora-rank")
        args = engine.extra_args
        rank = _option(args, "--max-lora-rank")
        return cls(int(rank) if rank and rank.isdigit() else engine.max_lora_rank,
                   fully_sharded_loras="--fully-sharded-loras" in args,
                   quantization=_option(args, "--quantization") or _option(args, "-q"),
                   source="the local vLLM's --max-lora-rank" + (
                       " in [engine] extra_args" if rank else " ([engine] max_lora_rank)"))


VLLM_DEFAULTS = EngineLimits()


def _option(args: Sequence[str], name: str) -> str | None:
    """The last value given for `name` (`name VALUE` or `name=VALUE`), as argparse keeps it."""
    value = None
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value
