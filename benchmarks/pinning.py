"""Keeping a CPU vLLM's worker threads apart from everything else during a benchmark.

vLLM's CPU worker runs an OpenMP parallel region per layer on the cores it is bound to; when
another process (the client, the gateway, vLLM's own front end) is scheduled on one of those
cores, the whole region waits for it. On a 2-core host that interference is larger than the
differences the benchmarks look for.
"""

from __future__ import annotations

import os

WORKER_CPU = 0
OTHERS_CPU = 1


def pin_worker_apart() -> dict[str, str]:
    """Move this process (and so every child it starts) to CPU 1; the environment that binds
    vLLM's worker threads to CPU 0 alone is returned for the engine's settings."""
    os.sched_setaffinity(0, {OTHERS_CPU})
    return {"VLLM_CPU_OMP_THREADS_BIND": str(WORKER_CPU)}
