"""Documents: the essay corpus, token-length chunking, and the prompt layout (context, then question).

The corpus is ``shared/data/essays`` beside the checkout (found by walking up from the working directory and from
this file; callers pass another folder explicitly — the CLI and service take it from ``KVCALIB_ESSAYS``); three
small essays are bundled as package data (``kvcalib.calib.data/text``) so the CLI and tests work without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from kvcalib.calib.data.hashing import content_hash  # noqa: F401  (re-exported: callers import it from here)
from kvcalib.calib.lm.protocols import Tokenizer

# The bundled essays: a real folder both in a checkout and in an installed wheel (setuptools installs package data
# unzipped), so ``Path`` operations work on it.
PACKAGE_DATA = Path(str(resources.files("kvcalib.calib.data") / "text"))


def _candidate_dirs(start: Path | None = None) -> list[Path]:
    dirs: list[Path] = []
    for origin in (start, Path.cwd(), Path(__file__).resolve()):
        if origin is None:
            continue
        for parent in [origin, *origin.parents]:
            dirs.append(parent / "shared" / "data" / "essays")
            dirs.append(parent.parent / "shared" / "data" / "essays")
    dirs.append(PACKAGE_DATA)
    return dirs


def essays_dir(override: str | Path | None = None, start: Path | None = None) -> Path:
    """The essay folder: ``override`` if given, else ``shared/data/essays`` found upward, else the bundled text."""
    if override:
        d = Path(override).expanduser()
        if d.is_dir() and any(d.glob("*.txt")):
            return d
        raise FileNotFoundError(f"essay folder {d} holds no .txt files")
    for d in _candidate_dirs(start):
        if d.is_dir() and any(d.glob("*.txt")):
            return d
    raise FileNotFoundError("no essay corpus found: pass a folder of .txt files (KVCALIB_ESSAYS for the CLI)")


def load_essays(directory: Path | None = None) -> dict[str, str]:
    """{name: text} of every .txt file, sorted by name."""
    d = directory or essays_dir()
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(d.glob("*.txt"))}


@dataclass
class Prompt:
    """Token ids of a prompt split where compression happens: the context is cached and compressed, the question
    (and everything after it) is fed afterwards through the compressed cache."""

    context_ids: torch.Tensor  # (N,)
    question_ids: torch.Tensor  # (q,)


CONTEXT_MARK = "\x00KVCALIB_CONTEXT\x00"


def chat_frame(tokenizer: Tokenizer, system: str | None = None) -> tuple[str, str]:
    """(head, tail): the chat template's text before and after one user turn's content, the tail ending with the
    assistant's generation prompt (("", "\\n") for a tokenizer without a template, as ``build_prompt``)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": CONTEXT_MARK}]
    if not getattr(tokenizer, "chat_template", None):
        return "", "\n"
    head, tail = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).split(CONTEXT_MARK)
    return head, tail


def build_prompt(tokenizer: Tokenizer, context: str, question: str, system: str | None = None) -> Prompt:
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


def chunk_by_tokens(tokenizer: Tokenizer, text: str, min_tokens: int, max_tokens: int) -> list[str]:
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
