"""Stored profiles and their fidelity curves."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from kvcalib.api.convert import profile_out
from kvcalib.api.deps import ReadAccess, ServiceDep
from kvcalib.api.schemas import MAX_ID, ErrorOut, ProfileOut

router = APIRouter(tags=["profiles"])
ProfileId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.get("/profiles/{profile_id}", response_model=ProfileOut, name="get_profile",
            summary="A calibrated profile: r*, budgets, features and the fidelity curve",
            responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}}, dependencies=[ReadAccess])
def get_profile(profile_id: ProfileId, request: Request, service: ServiceDep) -> ProfileOut:
    return profile_out(request, service.profile(profile_id))


@router.get("/profiles/{profile_id}/curve.png", name="get_profile_curve", response_class=Response,
            summary="The fidelity curve of a profile (PNG)",
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                       401: {"model": ErrorOut}, 404: {"model": ErrorOut}}, dependencies=[ReadAccess])
def get_profile_curve(profile_id: ProfileId, service: ServiceDep) -> Response:
    return Response(service.curve_png(profile_id), media_type="image/png")
