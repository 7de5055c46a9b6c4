"""Service views → response models (adds the absolute URLs of jobs, profiles and batches)."""

from __future__ import annotations

from fastapi import Request

from kvcalib.api.schemas import BatchOut, JobOut, ProfileOut
from kvcalib.service.core import CalibrationParams, DocumentInput


def job_out(request: Request, view: dict) -> JobOut:
    result = view.get("result")
    return JobOut(**view, url=str(request.url_for("get_job", job_id=view["id"])),
                  profile_url=str(request.url_for("get_profile", profile_id=result["profile_id"])) if result
                  else None)


def profile_out(request: Request, view: dict) -> ProfileOut:
    return ProfileOut(**view, curve_png_url=str(request.url_for("get_profile_curve", profile_id=view["id"])))


def batch_out(request: Request, view: dict) -> BatchOut:
    return BatchOut(**view, url=str(request.url_for("get_batch", batch_id=view["id"])))


def document_input(body) -> DocumentInput:
    return DocumentInput(text=body.text, document_id=body.document_id, document_hash=body.document_hash,
                         source=body.source)


def params_of(service, body) -> CalibrationParams:
    options = body.options.model_dump(exclude_none=True) if body.options is not None else None
    return service.params(body.model, body.method, body.allocator, body.tolerance, options)
