"""Batches: many documents calibrated as jobs, with aggregate progress."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from kvcalib.api.convert import batch_out, document_input, params_of
from kvcalib.api.deps import ReadAccess, ServiceDep, WriteAccess
from kvcalib.api.schemas import (
    MAX_ID,
    AllocatorName,
    BatchOut,
    BatchRequest,
    CalibrationOptions,
    Dtype,
    ErrorOut,
    MethodName,
    ModelName,
)
from kvcalib.service import BatchView, ServiceInputError, decode_utf8, parse_jsonl
from kvcalib.settings import DEVICE_PATTERN

router = APIRouter(tags=["batches"])
BatchId = Annotated[int, Path(ge=1, le=MAX_ID)]
ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut}, 422: {"model": ErrorOut},
          503: {"model": ErrorOut}}


def _respond(request: Request, view: BatchView) -> JSONResponse:
    out = batch_out(request, view)
    return JSONResponse(out.model_dump(mode="json"), status_code=202, headers={"Location": out.url})


@router.post("/batches", status_code=202, response_model=BatchOut, dependencies=[WriteAccess], responses=ERRORS,
             summary="Calibrate a list of documents (JSON)")
def create_batch(body: BatchRequest, request: Request, service: ServiceDep) -> JSONResponse:
    docs = [document_input(d) for d in body.documents]
    return _respond(request, service.submit_batch(docs, params_of(service, body)))


@router.post("/batches/upload", status_code=202, response_model=BatchOut, dependencies=[WriteAccess],
             responses=ERRORS, summary="Calibrate a JSONL corpus (multipart upload)")
def upload_batch(
    request: Request,
    service: ServiceDep,
    file: Annotated[UploadFile, File(description="JSONL: one {\"text\": …} object or JSON string per line.")],
    model: Annotated[ModelName | None, Form()] = None,
    method: Annotated[MethodName | None, Form()] = None,
    allocator: Annotated[AllocatorName | None, Form()] = None,
    tolerance: Annotated[float | None, Form(gt=0.0, le=1.0)] = None,
    options: Annotated[str | None, Form(description="CalibrationOptions as a JSON object.")] = None,
    dtype: Annotated[Dtype | None, Form(description="As `dtype` of POST /batches.")] = None,
    device: Annotated[str | None, Form(pattern=DEVICE_PATTERN, description="As `device` of POST /batches.")] = None,
) -> JSONResponse:
    text = decode_utf8(file.file.read(), "the uploaded corpus")
    docs = parse_jsonl(text, service.settings.max_batch_documents)
    opts = None
    if options:
        try:
            opts = CalibrationOptions.model_validate(json.loads(options)).model_dump(exclude_none=True)
        except ValueError as exc:  # JSONDecodeError and pydantic.ValidationError are ValueErrors
            raise ServiceInputError(f"invalid `options`: {exc}") from exc
    p = service.params(model, method, allocator, tolerance, opts, dtype, device)
    return _respond(request, service.submit_batch(docs, p))


@router.get("/batches/{batch_id}", response_model=BatchOut, name="get_batch", dependencies=[ReadAccess],
            responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}},
            summary="Progress of a batch (and its items)")
def get_batch(batch_id: BatchId, request: Request, service: ServiceDep,
              items: Annotated[bool, Query(description="Include the per-document items.")] = True) -> BatchOut:
    return batch_out(request, service.batch(batch_id, items=items))
