"""Talking to a real vLLM server, and the PEFT reference for what it should answer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import httpx
import torch

from tests.factories import load_base, load_peft

LOGPROB_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]


def complete(base_url: str, model: str, prompt: str, max_tokens: int = 8) -> Completion:
    """A greedy completion with the chosen tokens' logprobs."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "logprobs": 1, "return_token_ids": True}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return Completion(prompt_ids=choice["prompt_token_ids"], token_ids=choice["token_ids"],
                      logprobs=choice["logprobs"]["token_logprobs"])


# A few at a time: each is a whole copy of the base model (540 MB for the default one), and an
# unbounded cache held over 10 GB in the test process, pushing the model files out of the page
# cache that every engine start reads. Callers check one adapter's completions together.
@lru_cache(maxsize=3)
def _reference_model(base_dir: Path, adapter_dir: Path | None, dtype: torch.dtype,
                     ) -> torch.nn.Module:
    if adapter_dir is None:
        return load_base(base_dir, dtype)
    return load_peft(base_dir, adapter_dir, dtype)


def reference(base_dir: Path, adapter_dir: Path | None, completion: Completion,
              dtype: torch.dtype = torch.float32) -> tuple[list[int], list[float]]:
    """PEFT's greedy choice and its logprob of the engine's token at every generated step
    (the model run in `dtype`, its logits compared in float32)."""
    ids = torch.tensor([completion.prompt_ids + completion.token_ids])
    with torch.no_grad():
        logits = _reference_model(base_dir, adapter_dir, dtype)(ids).logits[0].float()
    steps = logits[len(completion.prompt_ids) - 1: -1].log_softmax(-1)
    chosen = torch.tensor(completion.token_ids)
    return steps.argmax(-1).tolist(), steps.gather(1, chosen[:, None])[:, 0].tolist()


def max_logprob_gap(base_dir: Path, adapter_dir: Path | None, completion: Completion,
                    label: str = "") -> float:
    """Largest |engine - PEFT| logprob; asserts greedy tokens agree first."""
    greedy, logprobs = reference(base_dir, adapter_dir, completion)
    assert completion.token_ids == greedy, (label, completion.token_ids, greedy)
    return max(abs(a - b) for a, b in zip(completion.logprobs, logprobs, strict=True))


def load_adapter(base_url: str, name: str, path: Path) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/load_lora_adapter",
                      json={"lora_name": name, "lora_path": str(path)}, timeout=300)


def unload_adapter(base_url: str, name: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
