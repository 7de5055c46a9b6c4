"""Stored documents: deletion with everything derived from them, and hash-only retention.

``DELETE /documents/{id}`` removes the text, the runs (jobs), their curve points and batch items, the profiles and
the stored predictions of its hash; a document with a queued or running job is refused (409) — deleting it under a
worker would fail that job.

With ``KVCALIB_STORE_DOCUMENT_TEXT=false`` a document is kept as its hash, size and token count: predictions and
compressions never store the text; a full calibration stores it for its job (the worker reads it there) and it is
erased once the document has no unfinished job — when the API next reads that job or its batch, at the next
submission, and at start-up."""

from __future__ import annotations

from kvcalib.service import repository as repo
from kvcalib.service.db import Database
from kvcalib.service.errors import ConflictError, NotFoundError
from kvcalib.service.inputs import check_document_id
from kvcalib.service.views import DocumentDeletion


class Documents:
    def __init__(self, db: Database, store_text: bool):
        self.db, self.store_text = db, store_text

    def delete(self, document_id: int) -> DocumentDeletion:
        check_document_id(document_id)
        with self.db.session() as s:
            doc = repo.get_document(s, document_id=document_id)
            if doc is None:
                raise NotFoundError(f"no document {document_id}")
            busy = repo.unfinished_runs_of_document(s, document_id=document_id)
            if busy:
                raise ConflictError(f"document {document_id} has unfinished job(s) {busy}: delete it once they "
                                    "finished")
            h = doc.content_hash
            n = repo.delete_document(s, document_id=document_id)
        return DocumentDeletion(document_id=document_id, document_hash=h, runs=n["runs"], profiles=n["profiles"],
                                curve_points=n["curve_points"], batch_items=n["batch_items"],
                                predictions=n["predictions"])

    def forget_texts(self, document_id: int | None = None) -> int:
        """Hash-only mode: erase the texts no unfinished job needs (one document's, or all); 0 otherwise."""
        if self.store_text:
            return 0
        with self.db.session() as s:
            return repo.forget_texts(s, document_id=document_id)
