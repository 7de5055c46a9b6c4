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

from fastapi import FastAPI

from kvcalib import __version__
from kvcalib.api.errors import install_error_handlers
from kvcalib.api.metrics import Metrics
from kvcalib.api.middleware import AccessMiddleware, BodyLimitMiddleware, MetricsMiddleware
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
* `/jobs`, `/batches`, `/profiles` — job lifecycle, batch progress, stored profiles and their curves;
  `DELETE /documents/{id}` — a document with its jobs, profiles and predictions.
* `GET /predictors` — the shipped, configured and registered predictors and the default of each model;
  `POST /predictors` — register a predictor from its JSON file; `GET /predictions` — the stored predictions.

Write endpoints (POST, DELETE) need `Authorization: Bearer <token>` when `KVCALIB_API_TOKEN` is set, reads of stored
data the read token when `KVCALIB_API_READ_TOKEN` is set (checked before the body is read: 401). Bad input is always
a 4xx with a `detail` message: 404 unknown ids, 409 conflicts, 413 bodies or documents over the limits, 422 invalid
input (unknown model/method/allocator list the valid choices). 429 (`Retry-After`): every synchronous-work slot is
busy; 503 (`Retry-After`): a dependency (broker, database) is down or synchronous work ran past its time limit.
"""


def create_app(settings: Settings | None = None, *, dispatcher: Dispatcher | None = None,
               load_engine: EngineLoader | None = None, resume: bool = True) -> FastAPI:
    from kvcalib.service import Service
    from kvcalib.service.db import prepare

    s = settings or get_settings()
    s.check_tokens()  # a blank token would read as "no authentication": refuse to start
    db = prepare(s.db_url, s.migrate_on_start)
    if dispatcher is None:
        if s.embedded:
            from kvcalib.service.jobs import InProcessDispatcher
            from kvcalib.service.leases import LeasePolicy
            from kvcalib.service.runtime import get_engine

            loader = load_engine or (
                lambda name, dtype=None, device=None: get_engine(name, device or s.worker_device, dtype))
            dispatcher = InProcessDispatcher(db, loader, workers=s.inprocess_workers,
                                             max_attempts=s.job_max_retries + 1, backoff=s.job_retry_backoff,
                                             leases=LeasePolicy.from_settings(s))
        else:
            from kvcalib.worker.dispatch import CeleryDispatcher

            dispatcher = CeleryDispatcher(s)
    service = Service(db, s, dispatcher, load_engine)
    if resume:  # start-up sweep, then a periodic one: expired leases, lost messages (kvcalib.service.sweeper)
        n = service.resume_unfinished()
        if n:
            log.info("dispatched %d unfinished job(s) again", n)
        service.start_sweeper()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.stop_sweeper()
        service.limiter.close()
        dispatcher.close(wait=False)
        db.dispose()

    if not s.store_document_text:
        service.forget_texts()  # hash-only mode: texts stored earlier go, unless an unfinished job needs one

    from fastapi_offline import FastAPIOffline  # /docs and /redoc with the Swagger UI / ReDoc assets of the wheel

    app = FastAPIOffline(title="kvcalib", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                         openapi_tags=[{"name": "calibration"}, {"name": "budget"}, {"name": "jobs"},
                                       {"name": "batches"}, {"name": "profiles"}, {"name": "documents"},
                                       {"name": "predictors"}, {"name": "operations"}])
    app.state.settings = s
    app.state.service = service
    app.state.metrics = Metrics(lambda: app.state.service)
    # added innermost first: metrics(access(body limit(app))) — the token is checked before the body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=s.max_request_bytes)
    app.add_middleware(AccessMiddleware, write_token=s.token, read_token=s.read_token)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)

    from kvcalib.api import (
        routes_batches,
        routes_budget,
        routes_calibrate,
        routes_documents,
        routes_health,
        routes_jobs,
        routes_predictors,
        routes_profiles,
    )

    for module in (routes_calibrate, routes_budget, routes_jobs, routes_batches, routes_profiles, routes_documents,
                   routes_predictors, routes_health):
        app.include_router(module.router)
    return app

