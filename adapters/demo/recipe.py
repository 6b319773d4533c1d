"""Train the demo adapters by self-distillation, offline and reproducibly.

The base model answers a fixed list of questions greedily; each answer is restyled by a
deterministic Python rule (capitals, pirate speech, one sentence), and an adapter learns to
produce the restyled answer. No data set or network is needed, and the style each adapter
adds is easy to see in a demo. `caps-lora` is `caps` as plain LoRA, for cost comparisons.

    python -m adapters.demo.recipe [--base DIR] [--out DIR] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from adapters.paths import default_model_dir

BASE_NAME = "SmolLM2-135M-Instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 0
STEPS = 100
BATCH = 4
LR = 2e-3
MAX_NEW_TOKENS = 48
IGNORE = -100

QUESTIONS = (
    "Why is the sky blue?",
    "What is photosynthesis?",
    "How do airplanes stay in the air?",
    "What is the moon made of?",
    "Why do leaves change color in autumn?",
    "What causes thunder?",
    "How does a compass work?",
    "What is gravity?",
    "Why is the ocean salty?",
    "What do bees do?",
    "How do volcanoes form?",
    "What is a black hole?",
    "Why do cats purr?",
    "What is the largest animal on Earth?",
    "How many legs does a spider have?",
    "What is a computer?",
    "What does a doctor do?",
    "What is the internet?",
    "How does a refrigerator keep food cold?",
    "What is a good name for a pet dog?",
    "Why do we need water?",
    "What is music?",
    "How do fish breathe underwater?",
    "What is a good breakfast?",
    "Why do people dream?",
    "What is a library?",
    "How can I learn a new language?",
    "What is the best way to save money?",
    "How do I make a cup of tea?",
    "What is a recipe for pancakes?",
    "Why should I read books?",
    "What is chess?",
    "How do I plant a tree?",
    "What is the weather like in winter?",
    "Why do birds migrate?",
    "What is electricity?",
    "How do I write a good email?",
    "What is friendship?",
    "Why is exercise important?",
    "What is a volcano?",
    "How do plants grow?",
    "What is a star?",
    "Why do we have seasons?",
    "What is a museum?",
    "How do I stay focused while studying?",
    "What is the speed of light?",
    "What is an ocean?",
    "Why do dogs bark?",
    "How do I ride a bicycle?",
    "What is a mountain?",
    "What makes a good teacher?",
    "How do I cook rice?",
    "What is the sun?",
    "Why is sleep important?",
    "What is a desert?",
    "How does the heart work?",
    "What is history?",
    "How do I make new friends?",
    "What is a robot?",
    "Why do we celebrate birthdays?",
)

LIST_MARKER = re.compile(r"^\s*(?:\d+\.|[-*])\s+", re.MULTILINE)
SENTENCE_END = re.compile(r"(?<=[a-z0-9][.!?])\s+|(?<=[a-z0-9][.!?][\"'])\s+")
COMPLETE = re.compile(r"[.!?][\"']?$")
PIRATE_WORDS = {
    "you": "ye", "your": "yer", "yours": "yers", "you're": "ye be", "you'll": "ye'll", "my": "me",
    "is": "be", "are": "be", "am": "be", "yes": "aye", "hello": "ahoy", "hi": "ahoy",
    "friend": "matey", "friends": "mateys", "money": "doubloons", "of": "o'",
}  # fmt: skip


def sentences(answer: str) -> list[str]:
    """Complete sentences only: an answer cut at MAX_NEW_TOKENS may end mid-sentence, and a
    line ending in a colon only introduces a list."""
    plain = LIST_MARKER.sub("", answer).replace("*", "").replace("#", "")
    lines = [" ".join(line.split()) for line in plain.splitlines() if line.strip()]
    parts = [part for line in lines for part in SENTENCE_END.split(line)]
    complete = [part for part in parts if COMPLETE.search(part)]
    return complete or [parts[0].rstrip(",;: ") + "."]


def pirate_word(word: str) -> str:
    """Swap one word, keeping a leading capital; '-ing' becomes the dropped-g "-in'"."""
    core = word.rstrip(".,!?;:")
    tail = word[len(core) :]
    swapped = PIRATE_WORDS.get(core.lower())
    if swapped is None:
        swapped = core[:-1] + "'" if core.endswith("ing") and len(core) > 4 else core
    elif core[:1].isupper():
        swapped = swapped[:1].upper() + swapped[1:]
    return swapped + tail


def to_caps(answer: str) -> str:
    return " ".join(sentences(answer)[:2]).upper()


def to_pirate(answer: str) -> str:
    body = " ".join(pirate_word(w) for w in " ".join(sentences(answer)[:2]).split())
    return f"Arr! Ye ask a fine question, matey. {body} Yo-ho-ho, me hearty!"


def to_brief(answer: str) -> str:
    return sentences(answer)[0]


STYLES: dict[str, Callable[[str], str]] = {"caps": to_caps, "pirate": to_pirate, "brief": to_brief}
ADAPTERS = {"caps": ("caps", True), "pirate": ("pirate", True), "brief": ("brief", True),
            "caps-lora": ("caps", False)}  # fmt: skip


def load_base(base: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def base_answers(base: Path, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The base model's own greedy answers: the content every style is applied to."""
    model = load_base(base).eval()
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(QUESTIONS), 8):
        prompts = [chat_prompt(tokenizer, q) for q in QUESTIONS[start : start + 8]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new = out[:, batch["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
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


def train(base: Path, examples: list, pad_id: int, use_dora: bool) -> PeftModel:
    """Same seed, data order and hyperparameters for every adapter: only the style differs."""
    torch.manual_seed(SEED)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=use_dora,
                        lora_dropout=0.0, task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(load_base(base), config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=STEPS)
    stream = batches(examples, pad_id, torch.Generator().manual_seed(SEED))
    for step in range(1, STEPS + 1):
        loss = model(**next(stream)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if step % 20 == 0:
            print(f"  step {step}/{STEPS} loss {loss.item():.3f}", flush=True)
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


def write_data(path: Path, answers: list[str]) -> None:
    """The training set, one question per line, so a reviewer can read what was learned."""
    pairs = zip(QUESTIONS, answers, strict=True)
    rows = [{"question": q} | {s: f(a) for s, f in STYLES.items()} for q, a in pairs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def elapsed(wall: float, cpu: float) -> str:
    """Wall and CPU seconds since a start: CPU time stays comparable on a shared machine."""
    return f"{time.monotonic() - wall:.0f}s wall, {time.process_time() - cpu:.0f}s CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=default_model_dir())
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--only", nargs="+", choices=sorted(ADAPTERS), default=sorted(ADAPTERS))
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    clock = (time.monotonic(), time.process_time())
    answers = base_answers(args.base, tokenizer)
    print(f"base answers: {elapsed(*clock)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_data(args.out / "data.jsonl", answers)
    for name in args.only:
        style, use_dora = ADAPTERS[name]
        examples = [
            encode(tokenizer, q, STYLES[style](a)) for q, a in zip(QUESTIONS, answers, strict=True)
        ]
        clock = (time.monotonic(), time.process_time())
        print(f"{name}: {'DoRA' if use_dora else 'LoRA'}, {len(examples)} examples", flush=True)
        save(train(args.base, examples, tokenizer.pad_token_id, use_dora), args.out / name)
        print(f"{name}: trained in {elapsed(*clock)}", flush=True)


if __name__ == "__main__":
    main()
