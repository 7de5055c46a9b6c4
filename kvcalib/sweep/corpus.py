"""The sweep's calibration corpus: documents cut from ``kvcalib calibrate``'s corpus formats."""

from __future__ import annotations

from pathlib import Path

from kvcalib.sweep.errors import SweepError


def load_corpus(path: str | Path | None = None, tokenizer=None, min_tokens: int = 256, max_tokens: int = 512,
                max_docs: int | None = 8) -> list[str]:
    """Documents of a calibration corpus, in the format of ``calib.data.corpus`` (``kvcalib calibrate``'s): a folder
    of ``.txt`` files or a JSONL file of ``{"id": ..., "text": ...}`` objects — or one ``.txt`` file; default: the
    essay corpus. With a ``tokenizer`` every text is cut at line boundaries into ``min_tokens..max_tokens``-token
    documents (``calib.data.documents.chunk_by_tokens``); without one, texts are taken whole. Chunks are taken
    round-robin over the texts, so a small ``max_docs`` still spans several of them."""
    from kvcalib.calib.data.corpus import read_texts
    from kvcalib.calib.data.documents import chunk_by_tokens, load_essays

    if path is None:
        from kvcalib.calib.data.documents import essays_dir
        from kvcalib.settings import get_settings

        texts = list(load_essays(essays_dir(get_settings().essays)).items())
    else:
        p = Path(path)
        texts = [(p.stem, p.read_text(encoding="utf-8"))] if p.is_file() and p.suffix == ".txt" else read_texts(p)
    if tokenizer is None:
        pieces = [[t] for _, t in texts if t.strip()]
    else:
        pieces = [chunk_by_tokens(tokenizer, t, min_tokens, max_tokens) for _, t in texts]
    docs = []
    for i in range(max((len(x) for x in pieces), default=0)):  # round-robin over the texts
        docs.extend(x[i] for x in pieces if i < len(x))
    if not docs:
        raise SweepError(f"no document of {min_tokens}..{max_tokens} tokens in the corpus (lower --doc-tokens?)")
    return docs[:max_docs] if max_docs else docs
