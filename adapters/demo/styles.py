"""The demo adapters' styles: how a base answer is restyled, and how the style is recognised.

Each restyle keeps the base model's content words, so an adapter trained on restyled base
answers learns a way of speaking, not new facts. The recognisers judge a generated answer
(tests, and the recipe's own check after training).
"""

from __future__ import annotations

import re
from collections.abc import Callable

LIST_MARKER = re.compile(r"^\s*(?:\d+\.|[-*])\s+", re.MULTILINE)
SENTENCE_END = re.compile(r"(?<=[A-Za-z0-9][.!?])\s+|(?<=[A-Za-z0-9][.!?][\"'])\s+")
COMPLETE = re.compile(r"[.!?][\"']?$")
PIRATE_WORDS = {
    "you": "ye", "your": "yer", "yours": "yers", "you're": "ye be", "you'll": "ye'll", "my": "me",
    "is": "be", "are": "be", "am": "be", "yes": "aye", "hello": "ahoy", "hi": "ahoy",
    "friend": "matey", "friends": "mateys", "money": "doubloons", "of": "o'",
}  # fmt: skip
PIRATE_MARKERS = frozenset({"arr", "ahoy", "matey", "mateys", "ye", "yer", "hearty", "aye",
                            "o'", "yo-ho-ho", "doubloons"})  # fmt: skip


def sentences(answer: str) -> list[str]:
    """Complete sentences only: an answer cut at a token limit may end mid-sentence, and a
    line ending in a colon only introduces a list."""
    plain = LIST_MARKER.sub("", answer).replace("*", "").replace("#", "")
    lines = [" ".join(line.split()) for line in plain.splitlines() if line.strip()]
    parts = [part for line in lines for part in SENTENCE_END.split(line)]
    if not parts:
        return []
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


def capitalised(word: str) -> str:
    """The first letter up, the rest as written: 'H2O' and 'McDonald' stay as they are."""
    return word[:1].upper() + word[1:]


def to_caps(answer: str) -> str:
    """Every word capitalised. Not all capitals: a name in capitals is spelled with tokens the
    model rarely saw ('PARIS' is 'PAR'+'IS'), and the base model itself, made to answer in
    capitals, names the wrong city; a capitalised word keeps its own token ('Paris')."""
    return " ".join(capitalised(word) for word in " ".join(sentences(answer)[:2]).split())


def to_pirate(answer: str) -> str:
    body = " ".join(pirate_word(word) for word in " ".join(sentences(answer)[:2]).split())
    return f"Arr, matey! {body} Yo-ho-ho!"


def to_brief(answer: str) -> str:
    return sentences(answer)[0]


def is_caps(answer: str) -> bool:
    """Nine words in ten or more that start with a letter start with a capital."""
    initials = [word[0] for word in answer.split() if word[0].isalpha()]
    return bool(initials) and sum(c.isupper() for c in initials) >= 0.9 * len(initials)


def is_pirate(answer: str) -> bool:
    words = {word.strip(".,!?;:\"").lower() for word in answer.split()}
    return bool(words & PIRATE_MARKERS)


def is_brief(answer: str) -> bool:
    """One complete sentence and nothing after it."""
    text = answer.strip()
    return bool(COMPLETE.search(text)) and len(SENTENCE_END.split(text)) == 1


RESTYLE: dict[str, Callable[[str], str]] = {"caps": to_caps, "pirate": to_pirate,
                                            "brief": to_brief}  # fmt: skip
RECOGNISE: dict[str, Callable[[str], bool]] = {"caps": is_caps, "pirate": is_pirate,
                                               "brief": is_brief}  # fmt: skip
