"""Documents: the essay corpus, token-length chunking, and the prompt layout (context, then question).

The corpus is ``../shared/data/essays`` beside the checkout (override with ``KVCALIB_ESSAYS``); three small essays
are bundled in the package (``kvcalib/data``) so the CLI and tests work without it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "kvcalib" / "data"


def _candidate_dirs() -> list[Path]:
    env = os.environ.get("KVCALIB_ESSAYS")
    dirs = [Path(env)] if env else []
    here = Path(__file__).resolve()
    for parent in here.parents:
        dirs.append(parent / "shared" / "data" / "essays")
        dirs.append(parent.parent / "shared" / "data" / "essays")
    dirs.append(Path.cwd().parent / "shared" / "data" / "essays")
    dirs.append(PACKAGE_DATA)
    return dirs


def essays_dir() -> Path:
    for d in _candidate_dirs():
        if d.is_dir() and any(d.glob("*.txt")):
            return d
    raise FileNotFoundError("no essay corpus found: set KVCALIB_ESSAYS to a folder of .txt files")


def load_essays(directory: Path | None = None) -> dict[str, str]:
    """{name: text} of every .txt file, sorted by name."""
    d = directory or essays_dir()
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(d.glob("*.txt"))}


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Prompt:
    """Token ids of a prompt split where compression happens: the context is cached and compressed, the question
    (and everything after it) is fed afterwards through the compressed cache."""

    context_ids: torch.Tensor  # (N,)
    question_ids: torch.Tensor  # (q,)


CONTEXT_MARK = "\x00KVCALIB_CONTEXT\x00"


def build_prompt(tokenizer, context: str, question: str, system: str | None = None) -> Prompt:
    """Chat-formatted prompt ``[system][user: context + question][assistant:]`` split after the context."""
    user = f"{CONTEXT_MARK}\n\n{question}"
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = user + "\n"
    head, tail = text.split(CONTEXT_MARK)
    ctx = tokenizer(head + context, add_special_tokens=False, return_tensors="pt").input_ids[0]
    q = tokenizer(tail, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return Prompt(context_ids=ctx, question_ids=q)


def chunk_by_tokens(tokenizer, text: str, min_tokens: int, max_tokens: int) -> list[str]:
    """Split ``text`` at line boundaries into pieces of ``min_tokens..max_tokens`` tokens (a short tail is
    dropped; a single line longer than ``max_tokens`` is skipped)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    pieces: list[str] = []
    cur: list[str] = []
    cur_len = 0
    for ln in lines:
        n = len(tokenizer(ln + "\n", add_special_tokens=False).input_ids)
        if cur and cur_len + n > max_tokens:
            if cur_len >= min_tokens:
                pieces.append("\n".join(cur))
            cur, cur_len = [], 0
        if n > max_tokens:
            continue
        cur.append(ln)
        cur_len += n
    if cur and cur_len >= min_tokens:
        pieces.append("\n".join(cur))
    return pieces
