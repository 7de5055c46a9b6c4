"""FastAPI dependencies: the service of the app, and the bearer tokens of write endpoints and of reads.

``AccessMiddleware`` (``kvcalib.api.middleware``) enforces the tokens before a body is read; the dependencies below
check again (a router mounted elsewhere stays protected) and declare the ``HTTPBearer`` scheme in the OpenAPI
schema."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kvcalib.service import Service

bearer = HTTPBearer(auto_error=False, description="KVCALIB_API_TOKEN for write endpoints; KVCALIB_API_READ_TOKEN "
                                                  "(or the write token) for reads of stored data, when set.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def get_service(request: Request) -> Service:  # async: no thread-pool hop on the hot path
    return request.app.state.service


def _check(credentials: HTTPAuthorizationCredentials | None, tokens: list[str]) -> None:
    given = credentials.credentials.encode() if credentials is not None else b""
    ok = False
    for t in tokens:
        ok |= secrets.compare_digest(given, t.encode())
    if not ok:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid bearer token is required for this endpoint",
                            headers={"WWW-Authenticate": "Bearer"})


async def require_token(request: Request, credentials: Credentials) -> None:
    token = request.app.state.settings.token
    if token is not None:
        _check(credentials, [token])


async def require_read_token(request: Request, credentials: Credentials) -> None:
    s = request.app.state.settings
    if s.read_token is not None:
        _check(credentials, [t for t in (s.read_token, s.token) if t is not None])


ServiceDep = Annotated[Service, Depends(get_service)]
WriteAccess = Depends(require_token)
ReadAccess = Depends(require_read_token)
