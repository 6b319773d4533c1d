"""A fix for vLLM 0.32's CPU LoRA ops: base-model tokens must get no LoRA at all.

punica marks a token without an adapter with slot index -1, and the CPU (torch) ops gather
`lora_weights[indices]`: index -1 selects the LAST slot, so whenever that slot holds an
adapter, base-model tokens batched with LoRA tokens silently get its A applied. We zero the
shrink output (x @ A.T) of those tokens; the expand step then adds exactly 0.0 for them.

Semantics: shrink(x, A, y, idx)[t] = 0 where idx[t] < 0, unchanged elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm.lora.ops.torch_ops import lora_ops
from vllm.lora.punica_wrapper import punica_cpu


def _zeroing_base_tokens(shrink: Callable[..., None]) -> Callable[..., None]:
    def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor,
                    output_tensor: torch.Tensor, lora_indices_tensor: torch.Tensor,
                    scaling: float = 1.0) -> None:
        shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        base_tokens = (lora_indices_tensor[: output_tensor.shape[0]] < 0).unsqueeze(-1)
        output_tensor.masked_fill_(base_tokens, 0)

    return bgmv_shrink


def patch_cpu_punica() -> None:
    """Route every CPU shrink (decode's bgmv and prefill's sgmv, which calls bgmv through
    the ops module) through the zeroing wrapper."""
    fixed = _zeroing_base_tokens(lora_ops.bgmv_shrink)
    lora_ops.bgmv_shrink = fixed
    punica_cpu.bgmv_shrink = fixed
