"""Train the demo adapters by self-distillation, offline and reproducibly.

The base model answers a varied list of prompts greedily (`questions`); each answer is
restyled by a deterministic rule (`styles`: every word capitalised, pirate speech, one
sentence) and an adapter learns to produce the restyled answer. The targets carry the base
model's own content, so the adapters change how the model speaks, not what it says (checked
on held-out facts by `tests/test_engine_demo_adapters.py`). `caps-lora` is `caps` as plain
LoRA (same data, rank, steps), for cost comparisons.
`--check` asks the held-out fact questions of the base model and each adapter (with PEFT).

    python -m adapters.demo.recipe [--base DIR] [--out DIR] [--only NAME ...] [--check]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from adapters.demo.questions import FACT_CHECKS, training_questions
from adapters.demo.styles import RECOGNISE, RESTYLE
from adapters.paths import default_model_dir

BASE_NAME = "SmolLM2-135M-Instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 0
BATCH = 8
MAX_NEW_TOKENS = 48
IGNORE = -100

ADAPTERS = {"caps": ("caps", True), "pirate": ("pirate", True), "brief": ("brief", True),
            "caps-lora": ("caps", False)}  # fmt: skip
# (steps, learning rate) per style. Capitalised words take longer to follow the base model's
# answers closely (fewer steps drift from them and lose facts; 180 steps overfit and lose more).
TRAINING = {"caps": (100, 1e-3), "pirate": (60, 5e-4), "brief": (60, 5e-4)}


def load_base(base: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                   questions: Sequence[str]) -> list[str]:
    """`model`'s greedy answers to `questions`, eight at a time, left-padded."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(questions), 8):
        prompts = [chat_prompt(tokenizer, q) for q in questions[start : start + 8]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :],
                                          skip_special_tokens=True)
    return answers


def encode(tokenizer: PreTrainedTokenizerBase, question: str, answer: str) -> tuple[list, list]:
    """Token ids and labels; only the answer and its end-of-turn token carry loss."""
    prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    reply = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt + reply, [IGNORE] * len(prompt) + reply


def batches(examples: list, pad_id: int, generator: torch.Generator) -> Iterator[dict]:
    """Right-padded shuffled batches, reshuffled every epoch, endlessly."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order) - BATCH + 1, BATCH):
            chosen = [examples[i] for i in order[start : start + BATCH]]
            width = max(len(ids) for ids, _ in chosen)
            pad = [width - len(ids) for ids, _ in chosen]
            yield {
                "input_ids": torch.tensor(
                    [ids + [pad_id] * p for (ids, _), p in zip(chosen, pad, strict=True)]
                ),
                "labels": torch.tensor(
                    [lab + [IGNORE] * p for (_, lab), p in zip(chosen, pad, strict=True)]
                ),
                "attention_mask": torch.tensor([[1] * (width - p) + [0] * p for p in pad]),
            }


def train(base: Path, examples: list, pad_id: int, use_dora: bool, steps: int,
          lr: float) -> PeftModel:
    """Same seed, data order and hyperparameters for every adapter: only the style differs."""
    torch.manual_seed(SEED)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=use_dora,
                        lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(load_base(base), config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=steps)
    stream = batches(examples, pad_id, torch.Generator().manual_seed(SEED))
    for step in range(1, steps + 1):
        loss = model(**next(stream)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % 20 == 0:
            print(f"  step {step}/{steps} loss {loss.item():.3f}", flush=True)
    return model


def save(model: PeftModel, directory: Path) -> None:
    """Write beside the target, then swap in: a failed run never leaves a half adapter."""
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    staging = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
    (staging / "README.md").unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def write_data(path: Path, questions: Sequence[str], answers: list[str]) -> None:
    """The training set, one prompt per line, so a reviewer can read what was learned."""
    rows = [{"question": q, "base": a} | {style: restyle(a) for style, restyle in RESTYLE.items()}
            for q, a in zip(questions, answers, strict=True)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def check(base: Path, out: Path, names: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> None:
    """Held-out facts kept and style shown, per adapter, on the questions the base gets right."""
    questions = [fact.question for fact in FACT_CHECKS]
    model = load_base(base).eval()
    known = [fact for fact, answer in zip(FACT_CHECKS, greedy_answers(model, tokenizer, questions),
                                          strict=True) if fact.answered_by(answer)]
    print(f"base: {len(known)}/{len(FACT_CHECKS)} facts right", flush=True)
    for name in names:
        style = ADAPTERS[name][0]
        # Merged (exact, as PEFT merges DoRA), so generation runs at the base model's speed.
        adapter = PeftModel.from_pretrained(load_base(base), out / name).merge_and_unload()
        answers = greedy_answers(adapter, tokenizer, [fact.question for fact in known])
        kept = sum(fact.answered_by(a) for fact, a in zip(known, answers, strict=True))
        styled = sum(RECOGNISE[style](a) for a in answers)
        print(f"{name}: {kept}/{len(known)} kept, {styled}/{len(known)} in style; "
              f"e.g. {answers[0]!r}", flush=True)


def elapsed(wall: float, cpu: float) -> str:
    """Wall and CPU seconds since a start: CPU time stays comparable on a shared machine."""
    return f"{time.monotonic() - wall:.0f}s wall, {time.process_time() - cpu:.0f}s CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=default_model_dir())
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--only", nargs="+", choices=sorted(ADAPTERS), default=sorted(ADAPTERS))
    parser.add_argument("--check", action="store_true", help="only check the trained adapters")
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if args.check:
        check(args.base, args.out, args.only, tokenizer)
        return
    questions = training_questions()
    clock = (time.monotonic(), time.process_time())
    answers = greedy_answers(load_base(args.base).eval(), tokenizer, questions)
    print(f"base answers: {elapsed(*clock)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_data(args.out / "data.jsonl", questions, answers)
    for name in args.only:
        style, use_dora = ADAPTERS[name]
        examples = [encode(tokenizer, q, RESTYLE[style](a))
                    for q, a in zip(questions, answers, strict=True)]
        clock = (time.monotonic(), time.process_time())
        print(f"{name}: {'DoRA' if use_dora else 'LoRA'}, {len(examples)} examples", flush=True)
        model = train(args.base, examples, tokenizer.pad_token_id, use_dora, *TRAINING[style])
        save(model, args.out / name)
        print(f"{name}: trained in {elapsed(*clock)}", flush=True)


if __name__ == "__main__":
    main()
