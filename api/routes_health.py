"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from kvcalib import __version__
from kvcalib.api.convert import readiness_out
from kvcalib.api.deps import ServiceDep
from kvcalib.api.schemas import Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness (no dependency is checked)")
async def healthz() -> Health:
    return Health(version=__version__)


@router.get("/readyz", response_model=Readiness, summary="Readiness: database at schema head, broker reachable",
            responses={503: {"model": Readiness}})
def readyz(service: ServiceDep) -> Response:
    r = service.readiness()
    return JSONResponse(readiness_out(r).model_dump(), status_code=200 if r.ready else 503)


@router.get("/metrics", summary="Prometheus metrics (kvcalib.api.metrics)", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
