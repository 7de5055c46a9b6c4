"""FastAPI dependencies: the service of the app, and the optional bearer token of write endpoints."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kvcalib.service import Service

bearer = HTTPBearer(auto_error=False, description="Needed by write endpoints when KVCALIB_API_TOKEN is set.")


async def get_service(request: Request) -> Service:  # async: no thread-pool hop on the hot path
    return request.app.state.service


async def require_token(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    token = request.app.state.settings.token
    if token is None:
        return
    if credentials is None or not secrets.compare_digest(credentials.credentials.encode(), token.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required for this endpoint",
                            headers={"WWW-Authenticate": "Bearer"})


ServiceDep = Annotated[Service, Depends(get_service)]
WriteAccess = Depends(require_token)
