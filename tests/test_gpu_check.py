"""The prepared GPU check runs where it will be run: without vLLM (blocked here), and on
this CPU-only machine it says that the CUDA-graph checks and timings need a GPU, after
checking the eager step (a wrong scale step fails it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WITHOUT_VLLM = ("import runpy, sys; sys.modules['vllm'] = None; "
                "runpy.run_module('benchmarks.gpu_check', run_name='__main__')")


def test_the_gpu_check_runs_without_vllm_and_says_it_needs_cuda():
    done = subprocess.run([sys.executable, "-c", WITHOUT_VLLM], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "CUDA is not available" in done.stdout
    assert "eager checks passed on the CPU" in done.stdout
