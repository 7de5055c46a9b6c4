"""Budgets for inference servers: ``GET /budget`` (stored profile) and ``POST /budget`` (predicted)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from kvcalib.api.convert import budget_out, document_input, params_of
from kvcalib.api.deps import ReadAccess, ServiceDep, WriteAccess
from kvcalib.api.schemas import AllocatorName, BudgetOut, BudgetRequest, ErrorOut, MethodName, ModelName

router = APIRouter(tags=["budget"])


@router.get("/budget", response_model=BudgetOut, summary="The stored budget of a calibrated document",
            dependencies=[ReadAccess],
            responses={401: {"model": ErrorOut},
                       404: {"model": ErrorOut, "description": "Not calibrated (the message says how to get it)."},
                       422: {"model": ErrorOut}, 503: {"model": ErrorOut}})
def get_budget(
    request: Request,
    service: ServiceDep,
    document_hash: Annotated[str, Query(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the document text.")],
    model: Annotated[ModelName | None, Query(description="Default: KVCALIB_DEFAULT_MODEL.")] = None,
    tolerance: Annotated[float | None, Query(gt=0.0, le=1.0, description="Default: KVCALIB_DEFAULT_TOLERANCE.")]
    = None,
    method: Annotated[MethodName | None, Query(description="Only profiles of this method.")] = None,
    allocator: Annotated[AllocatorName | None, Query(description="Only profiles of this allocator.")] = None,
) -> BudgetOut:
    s = service.settings
    view = service.stored_budget(document_hash, model or s.default_model,
                                 s.default_tolerance if tolerance is None else tolerance, method, allocator)
    request.app.state.metrics.observe_budget("/budget", view.source, view.ratio, view.predictor_version)
    return budget_out(view)


@router.post("/budget", response_model=BudgetOut, dependencies=[WriteAccess],
             summary="The budget of a document: its stored profile, else a prediction (synchronous)",
             responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut},
                        422: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}})
def post_budget(body: BudgetRequest, request: Request, service: ServiceDep) -> BudgetOut:
    view = service.predicted_budget(document_input(body), params_of(service, body), persist=False,
                                    prefer_profile=True)
    request.app.state.metrics.observe_budget("/budget", view.source, view.ratio, view.predictor_version)
    return budget_out(view)
