"""LoRA on the vocabulary-sized layers: the logits over lm_head, and the embeddings.

Few adapters train them, yet with LoRA enabled vLLM 0.32 runs its stock CPU ops on them for
every adapter token; the logits step gathers a copy of each token's lm_head B
(`[tokens, vocab, r]`), 6% of the engine's time in a profile of a mixed-adapter decode. The
logits layer's slots are tracked, and its LoRA step is skipped while no slot holds lm_head
weights, when it would add exactly zero. The logits are computed outside vLLM's compiled
graph, so that host-side check is safe in compiled mode. The embedding layer runs inside the
graph and its stock CPU op reads host-side batch state, so an adapter with embedding or
lm_head weights is refused when the CPU engine runs compiled (`vocab_refusal`).
"""

from __future__ import annotations

from vllm.lora.layers import LogitsProcessorWithLoRA, VocabParallelEmbeddingWithLoRA
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

LOADED_SLOTS = "dora_loaded_slots"  # on the logits layer's lora_b_stacked tensor


def vocab_refusal(manager, lora) -> str | None:
    """Why a compiled CPU engine cannot serve `lora` (its embedding or lm_head weights), or
    None."""
    vocab = sorted(name for name in lora.loras
                   if isinstance(manager.modules.get(name), (VocabParallelEmbeddingWithLoRA,
                                                             LogitsProcessorWithLoRA))
                   or name.endswith("lm_head"))
    if not vocab:
        return None
    return (f"LoRA on {', '.join(vocab)} is not supported by vLLM's compiled mode on the CPU "
            f"(its CPU embedding op is not trace-safe): serve with --enforce-eager")


def patch_vocab_lora() -> None:
    original_create = LogitsProcessorWithLoRA.create_lora_weights
    original_set = LogitsProcessorWithLoRA.set_lora
    original_reset = LogitsProcessorWithLoRA.reset_lora
    original_logits = PunicaWrapperCPU.add_lora_logits

    def create_lora_weights(self, *args, **kwargs) -> None:
        original_create(self, *args, **kwargs)
        setattr(self.lora_b_stacked, LOADED_SLOTS, set())

    def set_lora(self, index: int, lora_a, lora_b) -> None:
        original_set(self, index, lora_a, lora_b)
        getattr(self.lora_b_stacked, LOADED_SLOTS).add(index)

    def reset_lora(self, index: int) -> None:
        original_reset(self, index)
        getattr(self.lora_b_stacked, LOADED_SLOTS).discard(index)

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs):
        if not getattr(lora_b_stacked, LOADED_SLOTS, True):
            return None
        return original_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, **kwargs)

    LogitsProcessorWithLoRA.create_lora_weights = create_lora_weights
    LogitsProcessorWithLoRA.set_lora = set_lora
    LogitsProcessorWithLoRA.reset_lora = reset_lora
    PunicaWrapperCPU.add_lora_logits = add_lora_logits
