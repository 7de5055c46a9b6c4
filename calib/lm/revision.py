"""Model revisions: a content hash of the weights (and config), cached by file (path, size, mtime).

A fine-tuned copy with the same shapes and config but other weights gets another revision. Hashing ~0.5-2 GB of
safetensors takes seconds, so each weight file's SHA-256 is stored in ``<cache_dir>/revisions.json`` keyed by its
resolved path and re-read only when the file's size or mtime changed (the second load costs a ``stat``)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_LOCK = threading.Lock()
_MEMO: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) → sha256, per process


def _index_path(cache_dir: Path) -> Path:
    return cache_dir / "revisions.json"


def _read_index(cache_dir: Path) -> dict:
    try:
        return json.loads(_index_path(cache_dir).read_text())
    except (OSError, ValueError):
        return {}


def _write_index(cache_dir: Path, index: dict) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = _index_path(cache_dir).with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps(index, indent=0, sort_keys=True))
        tmp.replace(_index_path(cache_dir))
    except OSError:  # a read-only cache folder: the hash is still correct, only not remembered across processes
        pass


def file_sha256(path: Path, cache_dir: Path) -> str:
    """SHA-256 of ``path``'s bytes, cached by (resolved path, size, mtime) in memory and in ``cache_dir``."""
    path = path.resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
        index = _read_index(cache_dir)
        entry = index.get(str(path))
        if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
            _MEMO[key] = entry["sha256"]
            return entry["sha256"]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    with _LOCK:
        _MEMO[key] = digest
        index = _read_index(cache_dir)
        index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        _write_index(cache_dir, index)
    return digest


def model_revision(folder: Path, cache_dir: Path) -> str:
    """12 hex digits over the weight files' contents (``*.safetensors``, else ``*.bin``) and ``config.json``."""
    h = hashlib.sha256()
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for f in weights:
        h.update(f"{f.name}:{file_sha256(f, cache_dir)}\n".encode())
    h.update((folder / "config.json").read_bytes())
    return h.hexdigest()[:12]
