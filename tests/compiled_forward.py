"""A compiled adapter applied by a plain torch forward: the serving op outside any engine."""

from __future__ import annotations

import torch
from torch import nn

from adapters.compiled import CompiledAdapter, CompiledModule
from adapters.dora import apply_compiled


class CompiledLinear(nn.Module):
    """y = s * (W0 x) + B~ (A x) + b around a base nn.Linear or GPT-2 Conv1D."""

    def __init__(self, base: nn.Module, compiled: CompiledModule) -> None:
        super().__init__()
        transposed = type(base).__name__ == "Conv1D"
        self.weight = base.weight.T if transposed else base.weight
        self.bias = base.bias
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        c = self.compiled
        out = apply_compiled(flat, self.weight, self.bias, c.lora_a, c.fused_b, c.scale)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def apply_to_model(model: nn.Module, compiled: CompiledAdapter) -> nn.Module:
    """Swap every adapted layer of `model` (in place) for a `CompiledLinear`."""
    for module_name, layer in compiled.modules.items():
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, CompiledLinear(getattr(parent, child), layer))
    return model
