"""The DoRA scale step of the non-CPU path: one gather-multiply over persistent tensors.

It runs inside vLLM's traced graph and CUDA graphs, so it reads only tensors that live as
long as the engine (the layer's scale table, the batch plan's rows), never syncs with the
host and has no shape that depends on values. It imports nothing of vLLM, so the GPU check
(`benchmarks/gpu_check.py`) runs this very code on a machine without vLLM.
"""

from __future__ import annotations

import torch


def scale_rows(output: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> None:
    """Semantics: output[t, :] *= scales[rows[t], :] for every token t   (in place)

    Shapes: output [tokens, out], scales [max_loras + 1, out] (row 0 all ones: base-model
    tokens and plain LoRA slots), rows [max_tokens] (a `BatchPlan`'s; only the first
    `tokens` are read, so padded tokens need valid rows, which the plan keeps)."""
    output.mul_(scales.index_select(0, rows[: output.shape[0]]))
