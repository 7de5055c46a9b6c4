"""The FastAPI application: ``create_app(settings)`` (``uvicorn --factory kvcalib.api.app:create_app``).

Start-up happens in ``create_app`` itself (not in a lifespan hook) so that the app refuses to exist when the
database schema is not at the Alembic head — the embedded SQLite default is upgraded first (``auto_migrate``) — and
so that in-process ASGI clients get a ready app. Routers are thin: they parse, call ``kvcalib.service.Service``
and map its typed views onto the response models (``convert``); error codes come from the exception types
(``kvcalib.service.errors``).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kvcalib import __version__
from kvcalib.api.metrics import BodyLimitMiddleware, Metrics, MetricsMiddleware
from kvcalib.calib.errors import KvcalibError
from kvcalib.service.errors import UnavailableError
from kvcalib.settings import Settings, get_settings

if TYPE_CHECKING:
    from kvcalib.service import Dispatcher, EngineLoader

log = logging.getLogger("kvcalib.api")

DESCRIPTION = """\
Per-context calibration of KV-cache compression as a service.

* `POST /calibrate` — `predict` (synchronous budget from features + predictor), `full` (asynchronous calibration:
  202 + job URL), `compress` (the compressed KV cache as safetensors, see `kvcalib.calib.cache.export`).
* `GET /budget` — the stored profile of a document for inference servers (404 with a hint when not calibrated);
  `POST /budget` — a predicted budget for a new document.
* `/jobs`, `/batches`, `/profiles` — job lifecycle, batch progress, stored profiles and their curves.

Write endpoints (POST) need `Authorization: Bearer <token>` when `KVCALIB_API_TOKEN` is set. Bad input is always
a 4xx with a `detail` message: 404 unknown ids, 413 documents over the byte/token limits, 422 invalid parameters
(unknown model/method/allocator list the valid choices), 401 missing token; 503 means a dependency (broker,
database) is down.
"""


def create_app(settings: Settings | None = None, *, dispatcher: Dispatcher | None = None,
               load_engine: EngineLoader | None = None, resume: bool = True) -> FastAPI:
    from kvcalib.service import Service
    from kvcalib.service.db import prepare

    s = settings or get_settings()
    db = prepare(s.db_url, s.migrate_on_start)
    if dispatcher is None:
        if s.embedded:
            from kvcalib.service.jobs import InProcessDispatcher
            from kvcalib.service.runtime import get_engine

            loader = load_engine or (lambda name: get_engine(name, s.worker_device))
            dispatcher = InProcessDispatcher(db, loader, workers=s.inprocess_workers,
                                             max_attempts=s.job_max_retries + 1, backoff=s.job_retry_backoff)
        else:
            from kvcalib.worker.dispatch import CeleryDispatcher

            dispatcher = CeleryDispatcher(s)
    service = Service(db, s, dispatcher, load_engine)
    if s.embedded and resume and dispatcher.kind == "in-process":
        n = service.resume_unfinished()
        if n:
            log.info("resumed %d unfinished job(s)", n)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        dispatcher.close(wait=False)
        db.dispose()

    app = FastAPI(title="kvcalib", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  openapi_tags=[{"name": "calibration"}, {"name": "budget"}, {"name": "jobs"},
                                {"name": "batches"}, {"name": "profiles"}, {"name": "operations"}])
    app.state.settings = s
    app.state.service = service
    app.state.metrics = Metrics()
    app.add_middleware(BodyLimitMiddleware, max_bytes=s.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    _install_error_handlers(app)

    from kvcalib.api import routes_batches, routes_budget, routes_calibrate, routes_health, routes_jobs, routes_profiles

    for module in (routes_calibrate, routes_budget, routes_jobs, routes_batches, routes_profiles, routes_health):
        app.include_router(module.router)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    from sqlalchemy.exc import DBAPIError, OperationalError

    @app.exception_handler(KvcalibError)
    async def input_error(_request: Request, exc: KvcalibError):
        return JSONResponse({"detail": str(exc)}, status_code=getattr(exc, "status_code", 422))

    @app.exception_handler(UnavailableError)
    async def unavailable(_request: Request, exc: UnavailableError):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(OperationalError)
    async def db_down(_request: Request, exc: OperationalError):
        log.warning("database error: %s", exc)
        return JSONResponse({"detail": "the database is unavailable, retry later"}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(DBAPIError)
    async def db_error(_request: Request, exc: DBAPIError):
        if exc.connection_invalidated:
            return JSONResponse({"detail": "the database is unavailable, retry later"}, status_code=503)
        log.exception("database error", exc_info=exc)
        return JSONResponse({"detail": "internal database error"}, status_code=500)
