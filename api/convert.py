"""Request bodies → service inputs, and service views → response models (adding the absolute URLs of jobs,
profiles and batches). Response models read the views' attributes (``from_attributes``): each takes its own
fields, so a view may carry more than its response shows (a prediction's features on ``POST /budget``)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import Request

from kvcalib.api.schemas import (
    BatchDocument,
    BatchOut,
    BudgetOut,
    CalibrationParamsIn,
    DocumentIn,
    JobOut,
    PredictOut,
    ProfileOut,
    Readiness,
)
from kvcalib.service import BatchView, BudgetView, CalibrationParams, DocumentInput, JobView, ProfileView, Service
from kvcalib.service import Readiness as ReadinessView


def job_out(request: Request, view: JobView) -> JobOut:
    result = view.result
    return JobOut.model_validate({
        **asdict(view), "url": str(request.url_for("get_job", job_id=view.id)),
        "profile_url": str(request.url_for("get_profile", profile_id=result.profile_id)) if result else None})


def profile_out(request: Request, view: ProfileView) -> ProfileOut:
    return ProfileOut.model_validate({
        **asdict(view), "curve_png_url": str(request.url_for("get_profile_curve", profile_id=view.id))})


def batch_out(request: Request, view: BatchView) -> BatchOut:
    return BatchOut.model_validate({**asdict(view), "url": str(request.url_for("get_batch", batch_id=view.id))})


def budget_out(view: BudgetView) -> BudgetOut:
    return BudgetOut.model_validate(view, from_attributes=True)


def predict_out(view: BudgetView) -> PredictOut:
    return PredictOut.model_validate(view, from_attributes=True)


def readiness_out(view: ReadinessView) -> Readiness:
    return Readiness.model_validate(view, from_attributes=True)


def document_input(body: DocumentIn | BatchDocument | str) -> DocumentInput:
    if isinstance(body, str):
        return DocumentInput(text=body)
    return DocumentInput(text=body.text, document_id=body.document_id, document_hash=body.document_hash,
                         source=body.source)


def params_of(service: Service, body: CalibrationParamsIn) -> CalibrationParams:
    options = body.options.model_dump(exclude_none=True) if body.options is not None else None
    return service.params(body.model, body.method, body.allocator, body.tolerance, options, body.dtype, body.device)
