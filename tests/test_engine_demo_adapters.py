"""The demo adapters change how the model speaks, not what it knows. On held-out fact
questions the base model answers right, served by a real vLLM with greedy decoding:

- every adapter shows its style on at least 3 in 4 of those the base model did not already
  answer in that style (a capital city fits in one sentence anyway: `brief` is judged where
  the base model says more);
- every adapter keeps at least 3 in 4 of the facts right.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from adapters.demo.questions import FACT_CHECKS, FactCheck
from adapters.demo.recipe import ADAPTERS
from adapters.demo.styles import RECOGNISE

pytestmark = pytest.mark.vllm
MAX_TOKENS = 48
ENOUGH = 0.75


def answers(base_url: str, model: str, facts: list[FactCheck]) -> list[str]:
    """`model`'s greedy chat answers to `facts`, sent at once so vLLM batches them."""
    async def ask(client: httpx.AsyncClient, fact: FactCheck) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": fact.question}],
                "max_tokens": MAX_TOKENS, "temperature": 0}
        response = await client.post(f"{base_url}/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]

    async def ask_all() -> list[str]:
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*(ask(client, fact) for fact in facts))

    return asyncio.run(ask_all())


@pytest.fixture(scope="module")
def known_facts(engine) -> list[tuple[FactCheck, str]]:
    """The fact questions the base model answers right, with its answers."""
    base = answers(engine.base_url, "base", list(FACT_CHECKS))
    known = [(fact, answer) for fact, answer in zip(FACT_CHECKS, base, strict=True)
             if fact.answered_by(answer)]
    assert len(known) >= len(FACT_CHECKS) // 2, base
    return known


@pytest.fixture(scope="module")
def adapter_answers(engine, known_facts) -> dict[str, list[str]]:
    return {name: answers(engine.base_url, name, [fact for fact, _ in known_facts])
            for name in sorted(ADAPTERS)}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_demo_adapter_answers_in_its_own_style(known_facts, adapter_answers, name):
    recognise = RECOGNISE[ADAPTERS[name][0]]
    said = adapter_answers[name]
    judged = [answer for (_, base), answer in zip(known_facts, said, strict=True)
              if not recognise(base)]
    assert len(judged) >= 4, known_facts  # enough answers for the style check to fail
    assert sum(map(recognise, judged)) >= ENOUGH * len(judged), said


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_demo_adapter_keeps_the_facts(known_facts, adapter_answers, name):
    said = adapter_answers[name]
    kept = [fact.answered_by(answer) for (fact, _), answer in zip(known_facts, said, strict=True)]
    assert sum(kept) >= ENOUGH * len(known_facts), list(zip(said, kept, strict=True))
