"""Synthetic long-context tasks generated from the essay corpus (query-agnostic: the question comes after the
compressed context).

* ``passkey`` — one needle "The secret passcode for the {colour} door is {5 digits}." at a chosen depth in
  ~1.5k–3k tokens of essay text.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from kvcalib.calib.data.documents import load_essays

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden",
           "brown", "pink", "grey", "violet", "crimson", "turquoise"]


@dataclass
class TaskExample:
    context: str
    question: str
    answer: str
    meta: dict

    def score(self, output: str) -> bool:
        """True when the expected answer appears in the model's output."""
        return self.answer in re.findall(r"\d+", output) or self.answer in output


def haystack(tokenizer, n_tokens: int, rng: random.Random, essays: dict[str, str] | None = None) -> str:
    """About ``n_tokens`` tokens of essay text, essays taken in a seeded random order."""
    essays = essays or load_essays()
    names = sorted(essays)
    rng.shuffle(names)
    text = ""
    for name in names:
        text += essays[name].strip() + "\n\n"
        if len(text) > n_tokens * 6:
            break
    ids = tokenizer(text, add_special_tokens=False).input_ids[:n_tokens]
    return tokenizer.decode(ids)


def insert_at_depth(text: str, needle: str, depth: float) -> str:
    """Insert ``needle`` at the sentence boundary nearest to ``depth`` (0 = start, 1 = end) of ``text``."""
    target = int(len(text) * depth)
    cut = text.rfind(". ", 0, target)
    cut = 0 if cut < 0 or depth <= 0 else cut + 2
    return text[:cut] + needle + " " + text[cut:]


def passkey(tokenizer, n: int, seed: int = 0, n_tokens: int = 1500, depths: list[float] | None = None,
            essays: dict[str, str] | None = None) -> list[TaskExample]:
    """``n`` single-needle passkey examples. Depths cycle through ``depths`` (default evenly 0.1..0.9)."""
    rng = random.Random(seed)
    essays = essays or load_essays()
    depths = depths or [0.1 + 0.8 * i / max(1, n - 1) for i in range(n)]
    out = []
    for i in range(n):
        colour = rng.choice(COLOURS)
        code = f"{rng.randrange(10000, 100000)}"
        depth = depths[i % len(depths)]
        needle = f"The secret passcode for the {colour} door is {code}."
        ctx = insert_at_depth(haystack(tokenizer, n_tokens, rng, essays), needle, depth)
        out.append(TaskExample(
            context=ctx,
            question=f"What is the secret passcode for the {colour} door? Answer with the number only.",
            answer=code,
            meta={"task": "passkey", "depth": round(depth, 3), "colour": colour, "seed": seed, "index": i},
        ))
    return out


TASKS = {"passkey": passkey}
