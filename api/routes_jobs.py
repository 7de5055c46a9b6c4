"""Job status and retry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request

from kvcalib.api.convert import job_out
from kvcalib.api.deps import ReadAccess, ServiceDep, WriteAccess
from kvcalib.api.schemas import MAX_ID, ErrorOut, JobOut

router = APIRouter(tags=["jobs"])
JobId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get("/jobs/{job_id}", response_model=JobOut, name="get_job", summary="Status, progress and result of a job",
            responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}}, dependencies=[ReadAccess])
def get_job(job_id: JobId, request: Request, service: ServiceDep) -> JobOut:
    return job_out(request, service.job(job_id))


@router.post("/jobs/{job_id}/retry", response_model=JobOut, status_code=202, dependencies=[WriteAccess],
             summary="Queue a failed (or stale) job again",
             responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 409: {"model": ErrorOut},
                        503: {"model": ErrorOut}})
def retry_job(job_id: JobId, request: Request, service: ServiceDep) -> JobOut:
    return job_out(request, service.retry(job_id))
