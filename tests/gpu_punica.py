"""vLLM's GPU punica wrapper (`PunicaWrapperGPU`) run on the CPU, for tests of the plugin's
non-CPU path: everything of vLLM's is real (its `LoRAKernelMeta`, `update_metadata`,
`add_shrink` / `add_expand` / `add_lora_linear`), except its two Triton kernels, replaced by
a plain reference of their documented semantics and `meta_args`.

The references are registered as custom ops, as vLLM registers its kernels: a trace sees
one opaque call (which may read the CPU-side `no_lora_flag_cpu` and `num_active_loras`, as
the kernels' launch code does), so a compiled graph around them behaves as on a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import vllm.lora.punica_wrapper.punica_gpu as punica_gpu
from vllm.config.lora import LoRAConfig
from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU
from vllm.platforms.cpu import CpuPlatform

from adapters.vllm_plugin.layers import patch_update_metadata


def _token_rows(sorted_tokens: torch.Tensor, num_tokens_per_lora: torch.Tensor,
                start_loc: torch.Tensor, lora_ids: torch.Tensor,
                num_active_loras: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(lora id, its token rows) for each of the first `num_active_loras` entries of
    `lora_ids` that is an adapter (-1 is "no LoRA"): the kernels' grid over LoRAs."""
    for index in range(int(num_active_loras.item())):
        lora_id = int(lora_ids[index])
        if lora_id == -1:
            continue
        start = int(start_loc[index])
        yield lora_id, sorted_tokens[start:start + int(num_tokens_per_lora[index])].long()


@torch.library.custom_op("dora_gateway_tests::lora_shrink", mutates_args=("output_tensor",))
def reference_lora_shrink(inputs: torch.Tensor, lora_a_weights: list[torch.Tensor],
                          output_tensor: torch.Tensor, token_lora_mapping: torch.Tensor,
                          token_indices_sorted_by_lora_ids: torch.Tensor,
                          num_tokens_per_lora: torch.Tensor, lora_token_start_loc: torch.Tensor,
                          lora_ids: torch.Tensor, no_lora_flag_cpu: torch.Tensor,
                          num_active_loras: torch.Tensor, scaling: float) -> None:
    """Semantics (nothing at all when no_lora_flag_cpu; else output zeroed first):
        for each active lora L with tokens T, for each slice i:
            output_tensor[i, T] = scaling * inputs[T] @ lora_a_weights[i][L].T
    Shapes: inputs [tokens, in]; lora_a_weights[i] [max_loras, (1,) rank, in];
    output_tensor [slices, tokens, rank] (float32)."""
    if inputs.size(0) == 0 or no_lora_flag_cpu.item():
        return
    output_tensor.zero_()
    for lora_id, rows in _token_rows(token_indices_sorted_by_lora_ids, num_tokens_per_lora,
                                     lora_token_start_loc, lora_ids, num_active_loras):
        x = inputs[rows].float()
        for i, weights in enumerate(lora_a_weights):
            a = weights[lora_id].reshape(weights.shape[-2], weights.shape[-1]).float()
            output_tensor[i, rows] = (scaling * x @ a.T).to(output_tensor.dtype)


@reference_lora_shrink.register_fake
def _(inputs, lora_a_weights, output_tensor, token_lora_mapping,
      token_indices_sorted_by_lora_ids, num_tokens_per_lora, lora_token_start_loc, lora_ids,
      no_lora_flag_cpu, num_active_loras, scaling) -> None:
    return None


@torch.library.custom_op("dora_gateway_tests::lora_expand", mutates_args=("output_tensor",))
def reference_lora_expand(inputs: torch.Tensor, lora_b_weights: list[torch.Tensor],
                          output_tensor: torch.Tensor, token_lora_mapping: torch.Tensor,
                          token_indices_sorted_by_lora_ids: torch.Tensor,
                          num_tokens_per_lora: torch.Tensor, lora_token_start_loc: torch.Tensor,
                          lora_ids: torch.Tensor, no_lora_flag_cpu: torch.Tensor,
                          num_active_loras: torch.Tensor, offset_start: int = 0,
                          add_inputs: bool = False) -> None:
    """Semantics (nothing when no_lora_flag_cpu), slice i covering the output columns
    C_i = offset_start + sum(out_j, j < i) + [0, out_i):
        for each active lora L with tokens T, for each slice i:
            output_tensor[T, C_i] (+)= inputs[i, T] @ lora_b_weights[i][L].T
    (added when add_inputs, else written). Rows of no LoRA are left as they are.
    Shapes: inputs [slices, tokens, rank]; lora_b_weights[i] [max_loras, (1,) out_i, rank];
    output_tensor [tokens, columns]."""
    if inputs.size(1) == 0 or no_lora_flag_cpu.item():
        return
    for lora_id, rows in _token_rows(token_indices_sorted_by_lora_ids, num_tokens_per_lora,
                                     lora_token_start_loc, lora_ids, num_active_loras):
        offset = offset_start
        for i, weights in enumerate(lora_b_weights):
            b = weights[lora_id].reshape(weights.shape[-2], weights.shape[-1]).float()
            columns = slice(offset, offset + b.shape[0])
            value = inputs[i, rows].float() @ b.T
            if add_inputs:
                value = value + output_tensor[rows, columns].float()
            output_tensor[rows, columns] = value.to(output_tensor.dtype)
            offset += b.shape[0]


@reference_lora_expand.register_fake
def _(inputs, lora_b_weights, output_tensor, token_lora_mapping,
      token_indices_sorted_by_lora_ids, num_tokens_per_lora, lora_token_start_loc, lora_ids,
      no_lora_flag_cpu, num_active_loras, offset_start=0, add_inputs=False) -> None:
    return None


GPU_PUNICA_WRAPPER = f"{PunicaWrapperGPU.__module__}.{PunicaWrapperGPU.__qualname__}"
KERNELS = {"LoRAKernelMeta": LoRAKernelMeta,
           "lora_shrink": torch.ops.dora_gateway_tests.lora_shrink,
           "lora_expand": torch.ops.dora_gateway_tests.lora_expand}


@contextmanager
def gpu_punica_kernels() -> Iterator[None]:
    """vLLM's GPU wrapper module with the reference kernels (on the CPU it imports none),
    and the plugin's batch plan written by that wrapper, as on a GPU platform."""
    with pytest.MonkeyPatch.context() as patch:
        for name, kernel in KERNELS.items():
            patch.setattr(punica_gpu, name, kernel, raising=False)
        patch_update_metadata(PunicaWrapperGPU)
        yield


@contextmanager
def gpu_platform() -> Iterator[None]:
    """While LoRA layers are created: the platform's punica wrapper is the GPU one, so the
    plugin gives the layers the path GPU users get (scale step, then the wrapper's kernels)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CpuPlatform, "get_punica_wrapper",
                      classmethod(lambda cls: GPU_PUNICA_WRAPPER))
        yield


def gpu_wrapper(max_tokens: int, config: LoRAConfig) -> PunicaWrapperGPU:
    """vLLM's GPU wrapper (inside `gpu_punica_kernels`), on CPU tensors."""
    return PunicaWrapperGPU(max_tokens, max_batches=max_tokens, device="cpu",
                            lora_config=config)


def use_gpu_wrapper_in_engine() -> None:
    """A vLLM general plugin for tests (`engine_plugin_path`): the CPU engine runs vLLM's
    GPU wrapper with the reference kernels, for the rest of the process."""
    for name, kernel in KERNELS.items():
        setattr(punica_gpu, name, kernel)
    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: GPU_PUNICA_WRAPPER)
    patch_update_metadata(PunicaWrapperGPU)


def engine_plugin_path(directory: Path) -> str:
    """A PYTHONPATH under which vLLM finds `use_gpu_wrapper_in_engine` as a general plugin
    (a distribution's metadata in `directory`, naming it), beside dora-gateway's own."""
    info = directory / "dora_gateway_test_gpu_wrapper-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: dora-gateway-test-gpu-wrapper\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[vllm.general_plugins]\n"
        f"gpu_wrapper = {__name__}:{use_gpu_wrapper_in_engine.__name__}\n")
    return os.pathsep.join([str(directory), str(Path(__file__).resolve().parents[1])])
