"""The DoRA math, in float32, with PEFT's semantics as the reference.

For a linear layer W0 [out, in], adapter A [r, in], B [out, r], magnitude m [out] and
scaling g (see `LoraSettings.scaling_for`):

    V = W0 + g * B @ A                       direction, unnormalised
    s = m / ||V||_2   (per output row)       [out]
    y = s * (W0 @ x) + (g * s[:, None] * B) @ (A @ x) + b     bias is not scaled

`s` and the fused `B~ = g * s[:, None] * B` depend only on the adapter and the base
weights, so they are computed once per adapter; serving then costs a LoRA step plus one
per-row multiply. A plain LoRA adapter is the case s = 1.
"""

from __future__ import annotations

import torch

ROW_CHUNK = 4096


def weight_norm(w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """||W0 + g * B @ A||_2 per output row, float32, in row chunks to bound memory.

    Semantics: norm[o] = sqrt(sum_i (W0[o, i] + g * sum_k B[o, k] * A[k, i]) ** 2)
    Shapes: w0 [out, in], lora_a [r, in], lora_b [out, r] -> [out].
    """
    a = lora_a.float()
    norms = []
    for start in range(0, w0.shape[0], ROW_CHUNK):
        rows = w0[start:start + ROW_CHUNK].float()
        delta = lora_b[start:start + ROW_CHUNK].float() @ a
        norms.append(torch.linalg.norm(rows + scaling * delta, dim=1))
    return torch.cat(norms)


def dora_scale(w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """s = m / ||W0 + g * B @ A||, shape [out], float32."""
    return magnitude.float() / weight_norm(w0, lora_a, lora_b, scaling)


def fused_lora_b(lora_b: torch.Tensor, scaling: float,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """B~ = g * s[:, None] * B (s = 1 for plain LoRA), shape [out, r], float32."""
    fused = scaling * lora_b.float()
    return fused if scale is None else scale[:, None] * fused


def apply_compiled(x: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None,
                   lora_a: torch.Tensor, fused_b: torch.Tensor,
                   scale: torch.Tensor | None) -> torch.Tensor:
    """The serving-time layer op, the reference for the engine's kernels.

    Semantics: y = s * (x @ W0.T) + (x @ A.T) @ B~.T + b
    Shapes: x [tokens, in], w0 [out, in], lora_a [r, in], fused_b [out, r], scale [out].
    """
    base_out = x @ w0.T
    if scale is not None:
        base_out = base_out * scale
    out = base_out + (x @ lora_a.T) @ fused_b.T
    return out if bias is None else out + bias


def merged_weight(w0: torch.Tensor, lora_a: torch.Tensor, fused_b: torch.Tensor,
                  scale: torch.Tensor | None) -> torch.Tensor:
    """diag(s) @ W0 + B~ @ A = diag(s) @ (W0 + g * B @ A), float32, shape [out, in]."""
    base = w0.float() if scale is None else scale[:, None] * w0.float()
    return base + fused_b @ lora_a.float()
