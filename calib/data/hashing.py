"""Content hashes of documents (torch-free: the client and the service import it without the engine)."""

from __future__ import annotations

import hashlib


def content_hash(text: str) -> str:
    """SHA-256 of the UTF-8 text: the key of a document in the profile store and the client cache."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
