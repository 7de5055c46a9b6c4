"""Stored documents: ``DELETE /documents/{id}`` removes a document's text with its jobs, curves and profiles."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Path

from kvcalib.api.deps import ServiceDep, WriteAccess
from kvcalib.api.schemas import MAX_ID, DocumentDeletedOut, ErrorOut

router = APIRouter(tags=["documents"])
DocumentId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.delete("/documents/{document_id}", response_model=DocumentDeletedOut, dependencies=[WriteAccess],
               summary="Delete a document: its text, jobs, curves and profiles",
               responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut},
                          409: {"model": ErrorOut, "description": "One of its jobs is queued or running."},
                          422: {"model": ErrorOut}, 503: {"model": ErrorOut}})
def delete_document(document_id: DocumentId, service: ServiceDep) -> DocumentDeletedOut:
    return DocumentDeletedOut.model_validate(asdict(service.delete_document(document_id)))
