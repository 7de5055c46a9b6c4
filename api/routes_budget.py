"""Budgets for inference servers: ``GET /budget`` (stored profile, by document hash or by the hash of the exact
context token ids) and ``POST /budget`` (stored, else predicted; from a document or from token ids)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from kvcalib.api.convert import budget_out, document_input, params_of
from kvcalib.api.deps import ReadAccess, ServiceDep, WriteAccess
from kvcalib.api.schemas import AllocatorName, BudgetOut, BudgetRequest, Dtype, ErrorOut, MethodName, ModelName
from kvcalib.service import ServiceInputError

router = APIRouter(tags=["budget"])


@router.get("/budget", response_model=BudgetOut, summary="The stored budget of a calibrated document",
            dependencies=[ReadAccess],
            responses={401: {"model": ErrorOut},
                       404: {"model": ErrorOut, "description": "Not calibrated (the message says how to get it)."},
                       422: {"model": ErrorOut}, 503: {"model": ErrorOut}})
def get_budget(
    request: Request,
    service: ServiceDep,
    document_hash: Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$",
                                               description="SHA-256 of the document text.")] = None,
    ids_hash: Annotated[str | None, Query(
        pattern=r"^[0-9a-f]{64}$", description="Instead of document_hash: token_ids_hash(model, ids) of the exact "
                                               "context token ids a server prefills (SHA-256 over the model name, "
                                               "one NUL byte and the ids as int32 little-endian).")] = None,
    model: Annotated[ModelName | None, Query(description="Default: KVCALIB_DEFAULT_MODEL.")] = None,
    tolerance: Annotated[float | None, Query(gt=0.0, le=1.0, description="Default: KVCALIB_DEFAULT_TOLERANCE.")]
    = None,
    method: Annotated[MethodName | None, Query(description="Only profiles of this method.")] = None,
    allocator: Annotated[AllocatorName | None, Query(description="Only profiles of this allocator.")] = None,
    dtype: Annotated[Dtype | None, Query(description="Only profiles measured in this dtype.")] = None,
    include_positions: Annotated[bool, Query(description="Also return `kept_positions`.")] = False,
) -> BudgetOut:
    s = service.settings
    view = service.stored_budget(model=model or s.default_model,
                                 tolerance=s.default_tolerance if tolerance is None else tolerance,
                                 document_hash=document_hash, ids_hash=ids_hash, method=method, allocator=allocator,
                                 dtype=dtype, include_positions=include_positions)
    request.app.state.metrics.observe_budget("/budget", view.source, view.ratio, view.predictor_version)
    return budget_out(view)


@router.post("/budget", response_model=BudgetOut, dependencies=[WriteAccess],
             summary="The budget of a document or of token ids: the stored profile, else a prediction (synchronous)",
             responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut},
                        422: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}})
def post_budget(body: BudgetRequest, request: Request, service: ServiceDep) -> BudgetOut:
    given = [x is not None for x in (body.text, body.document_id, body.document_hash, body.token_ids)]
    if sum(given) != 1:
        raise ServiceInputError("give exactly one of `text`, `document_id`, `document_hash` or `token_ids`")
    p = params_of(service, body)
    if body.token_ids is not None:
        view = service.token_ids_budget(body.token_ids, p, include_positions=body.include_positions)
    else:
        view = service.predicted_budget(document_input(body), p, persist=False, prefer_profile=True,
                                        include_positions=body.include_positions)
    request.app.state.metrics.observe_budget("/budget", view.source, view.ratio, view.predictor_version)
    return budget_out(view)
