"""Corpora of documents to calibrate, label files and train/calibration/test splits: the data side of
``kvcalib calibrate|fit|evaluate`` and ``benchmarks/calibration_corpus.py`` (fitting and evaluating predictors lives
in ``calib.predictors``).

* A corpus is a folder of ``.txt`` files or a JSONL file of ``{"id": ..., "text": ...}`` objects; every text is cut
  into ``min_tokens..max_tokens``-token documents at line boundaries (``calib.documents.chunk_by_tokens``), named
  ``{id}#{i}``.
* A label file is JSONL, one ``CalibrationResult.to_dict()`` per line; a document is done when a line with its
  ``content_hash`` and the config's ``params_hash`` exists (resumable runs).
* Splits are by *group* (the id before ``#``: chunks of one essay never straddle splits), assigned at random from a
  seed so that train / calibration / test contexts stay exchangeable.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from kvcalib.calib.data.documents import chunk_by_tokens, content_hash
from kvcalib.calib.data.jsonl import iter_jsonl
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.lm.protocols import Tokenizer


class CorpusError(KvcalibError):
    pass


@dataclass
class Document:
    id: str
    text: str

    @property
    def content_hash(self) -> str:
        return content_hash(self.text)


def _read_utf8(path: Path) -> str:
    """The text of ``path``; invalid UTF-8 is a ``CorpusError`` naming the file (also for files of a folder)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{str(path)!r} is not valid UTF-8 (invalid byte at offset {exc.start})") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, obj in iter_jsonl(_read_utf8(path).split("\n"), lambda i, msg: CorpusError(f"{path}:{i}: {msg}")):
        if not isinstance(obj, dict):
            raise CorpusError(f"{path}:{i}: expected a JSON object")
        rows.append(obj)
    return rows


def read_texts(path: str | Path) -> list[tuple[str, str]]:
    """(id, text) pairs of a corpus folder (``*.txt``, sorted) or JSONL file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CorpusError(f"corpus folder {str(path)!r} holds no .txt files")
        return [(f.stem, _read_utf8(f)) for f in files]
    if path.is_file():
        out = []
        for i, obj in enumerate(_read_jsonl(path), 1):
            if not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise CorpusError(f"{path}: record {i} has no non-empty \"text\" string")
            out.append((str(obj.get("id", f"doc{i}")), obj["text"]))
        if not out:
            raise CorpusError(f"corpus file {str(path)!r} holds no documents")
        return out
    raise CorpusError(f"corpus {str(path)!r} does not exist (expected a folder of .txt or a JSONL file)")


def load_corpus(path: str | Path, tokenizer: Tokenizer, min_tokens: int = 1000, max_tokens: int = 3000,
                limit: int | None = None, seed: int | None = None) -> list[Document]:
    """The corpus cut into ``min_tokens..max_tokens``-token documents (shuffled by ``seed`` when given)."""
    if min_tokens < 1 or max_tokens < min_tokens:
        raise CorpusError(f"need 1 <= --min-tokens <= --max-tokens, got {min_tokens}..{max_tokens}")
    docs = []
    for doc_id, text in read_texts(path):
        pieces = chunk_by_tokens(tokenizer, text, min_tokens, max_tokens)
        for i, piece in enumerate(pieces):
            docs.append(Document(id=f"{doc_id}#{i}", text=piece))
    if not docs:
        raise CorpusError(f"no document of {min_tokens}..{max_tokens} tokens in {str(path)!r} "
                          f"(lower --min-tokens?)")
    if seed is not None:
        random.Random(seed).shuffle(docs)
    return docs[:limit] if limit else docs


# ---------------------------------------------------------------------------------------------------- labels
def read_labels(path: str | Path, must_exist: bool = True) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        if must_exist:
            raise CorpusError(f"label file {str(path)!r} does not exist")
        return []
    rows = _read_jsonl(path)
    for i, r in enumerate(rows, 1):
        for key in ("r_star", "features", "ratios", "fidelity", "config", "content_hash"):
            if key not in r:
                raise CorpusError(f"{path}: line {i} is not a calibration result (no {key!r})")
    return rows


def done_keys(labels: list[dict]) -> set[tuple[str, str]]:
    return {(r.get("content_hash", ""), r.get("params_hash", "")) for r in labels}


def append_label(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(result, allow_nan=False) + "\n")
        fh.flush()


def group_of(record: dict) -> str:
    doc_id = record.get("doc_id") or record.get("content_hash", "")
    return str(doc_id).split("#")[0]


def consistent_labels(labels: list[dict]) -> list[dict]:
    """Labels of one configuration (method, allocator, tolerance, grid); raises if they mix several."""
    if not labels:
        raise CorpusError("no labels")
    keys = {(r["config"].get("method"), r["config"].get("allocator"), r["config"].get("tolerance"),
             tuple(r["config"].get("ratios", ()))) for r in labels}
    if len(keys) > 1:
        raise CorpusError(f"labels mix {len(keys)} configurations (method, allocator, tolerance, ratios): "
                          f"{sorted(map(str, keys))[:3]}…; keep one per file")
    seen, out = set(), []
    for r in labels:  # one label per document and configuration
        k = (r["content_hash"], r.get("params_hash"))
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def split_labels(labels: list[dict], seed: int = 0, fractions=(0.5, 0.25, 0.25),
                 by_group: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """Random train / calibration / test split (whole groups when ``by_group``), sizes close to ``fractions``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise CorpusError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if len(labels) < 3:
        raise CorpusError(f"need at least 3 labelled documents to split, got {len(labels)}")
    rng = random.Random(seed)
    groups: dict[str, list[dict]] = {}
    for r in labels:
        groups.setdefault(group_of(r) if by_group else r["content_hash"], []).append(r)
    names = sorted(groups)
    rng.shuffle(names)
    if by_group and len(names) < 3:
        return split_labels(labels, seed, fractions, by_group=False)
    total = len(labels)
    targets = [fractions[0] * total, (fractions[0] + fractions[1]) * total]
    parts: tuple[list, list, list] = ([], [], [])
    acc = 0
    for i, g in enumerate(names):
        remaining = len(names) - i
        idx = 0 if acc < targets[0] else (1 if acc < targets[1] else 2)
        # make sure calibration and test both get at least one group
        if remaining <= 2 and not parts[1] and idx == 0:
            idx = 1
        if remaining == 1 and not parts[2]:
            idx = 2
        parts[idx].extend(groups[g])
        acc += len(groups[g])
    return parts
