"""Predictors and stored predictions: ``GET /predictors`` (shipped, configured and registered ones, and the default
of each model), ``POST /predictors`` (register a predictor from its JSON file), ``GET /predictions``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response

from kvcalib.api.deps import ReadAccess, ServiceDep, WriteAccess
from kvcalib.api.schemas import (
    AllocatorName,
    ErrorOut,
    MethodName,
    ModelName,
    PredictionOut,
    PredictionsOut,
    PredictorOut,
    PredictorsOut,
)

router = APIRouter(tags=["predictors"])


@router.get("/predictors", response_model=PredictorsOut, dependencies=[ReadAccess],
            summary="The predictors of this service: shipped, configured, registered; the default of each model",
            responses={401: {"model": ErrorOut}, 503: {"model": ErrorOut}})
def list_predictors(service: ServiceDep) -> PredictorsOut:
    return PredictorsOut.model_validate(asdict(service.predictor_listing()))


@router.post("/predictors", response_model=PredictorOut, status_code=201, dependencies=[WriteAccess],
             summary="Register a predictor from its JSON file (as written by `kvcalib fit`)",
             responses={200: {"model": PredictorOut, "description": "This version was registered before."},
                        401: {"model": ErrorOut}, 413: {"model": ErrorOut},
                        422: {"model": ErrorOut, "description": "Not a valid predictor file (the message says why)."},
                        503: {"model": ErrorOut}})
def register_predictor(
    response: Response,
    service: ServiceDep,
    predictor: Annotated[dict[str, Any], Body(description="The predictor file's JSON (`Predictor.to_json()`: format, "
                                                          "kind, params, content_hash, metrics, training).")],
    model: Annotated[ModelName | None, Query(description="Bind it to this model (default: its training "
                                                         "configuration's model, else any model).")] = None,
) -> PredictorOut:
    info, created = service.register_predictor(predictor, model)
    response.status_code = 201 if created else 200
    return PredictorOut.model_validate(asdict(info))


@router.get("/predictions", response_model=PredictionsOut, dependencies=[ReadAccess],
            summary="Stored predictions, newest first",
            responses={401: {"model": ErrorOut}, 422: {"model": ErrorOut}, 503: {"model": ErrorOut}})
def list_predictions(
    service: ServiceDep,
    document_hash: Annotated[str | None, Query(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the document "
                                                                                       "text.")] = None,
    model: Annotated[ModelName | None, Query()] = None,
    method: Annotated[MethodName | None, Query()] = None,
    allocator: Annotated[AllocatorName | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> PredictionsOut:
    views = service.predictions(document_hash, model, method, allocator, limit)
    return PredictionsOut(predictions=[PredictionOut.model_validate(asdict(v)) for v in views])
