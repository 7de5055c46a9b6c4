"""The service layer's entry point: everything the HTTP routers, the Celery worker and the CLI call. Routers stay
thin (parse, call one method, serialise); ``Service`` composes small collaborators, one concept each:

* ``RequestValidator`` (``validation.py``) — parameters → ``CalibrationParams`` / ``CalibrationConfig``, documents;
* ``Submitter`` (``submission.py``) — jobs and batches written and dispatched, retries, resume after restart;
* ``StoreReader`` (``queries.py``) — job, batch and profile views; ``plots.curve_png`` — the curve of a profile;
* ``Budgets`` (``budgets.py``) — stored and predicted budgets, with ``Predictors`` (``predictions.py``);
* ``Compressor`` (``compress.py``) — the compressed KV cache download.

Jobs are dispatched through a ``Dispatcher`` (``dispatch.py``) given at construction —
``jobs.InProcessDispatcher`` (embedded) or ``kvcalib.worker.dispatch.CeleryDispatcher`` — so this package never
imports the API or the worker. Results are typed views (``views.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvcalib.service.budgets import Budgets
from kvcalib.service.compress import Compressor
from kvcalib.service.db import Database, check_schema
from kvcalib.service.dispatch import Dispatcher
from kvcalib.service.inputs import CalibrationParams, DocumentInput
from kvcalib.service.plots import curve_png
from kvcalib.service.predictions import Predictors
from kvcalib.service.queries import StoreReader
from kvcalib.service.runtime import EngineLoader
from kvcalib.service.submission import Submitter
from kvcalib.service.validation import RequestValidator
from kvcalib.service.views import BatchView, BudgetView, CompressedCache, JobView, ProfileView, Readiness

if TYPE_CHECKING:
    from kvcalib.settings import Settings


class Service:
    def __init__(self, db: Database, settings: Settings, dispatcher: Dispatcher | None = None,
                 load_engine: EngineLoader | None = None):
        from kvcalib.service.runtime import get_engine

        self.db = db
        self.settings = settings
        self.dispatcher = dispatcher
        self.load_engine: EngineLoader = load_engine or (lambda name: get_engine(name, settings.worker_device))
        self.validator = RequestValidator(settings)
        self.reader = StoreReader(db)
        self.submitter = Submitter(db, settings, dispatcher, self.validator, self.reader)
        self.predictors = Predictors(db, settings)
        self.budgets = Budgets(db, self.validator, self.predictors, self.load_engine)
        self.compressor = Compressor(db, self.validator, self.predictors, self.load_engine)

    # ------------------------------------------------------------------------------------------------ validation
    def params(self, model: str | None = None, method: str | None = None, allocator: str | None = None,
               tolerance: float | None = None, options: dict[str, Any] | None = None) -> CalibrationParams:
        """Request parameters with the settings' defaults filled in, validated (unknown names → 422)."""
        return self.validator.params(model, method, allocator, tolerance, options)

    # ------------------------------------------------------------------------------------------------ jobs, batches
    def submit(self, doc: DocumentInput, p: CalibrationParams) -> tuple[JobView, bool]:
        """Create (or find) the run of a document and dispatch it. Returns (job view, finished already)."""
        return self.submitter.submit(doc, p)

    def submit_many(self, docs: Sequence[DocumentInput], p: CalibrationParams) -> list[JobView]:
        return self.submitter.submit_many(docs, p)

    def submit_batch(self, docs: Sequence[DocumentInput], p: CalibrationParams) -> BatchView:
        return self.submitter.submit_batch(docs, p)

    def retry(self, run_id: int) -> JobView:
        """Queue a failed (or stale) job again (409 for other states)."""
        return self.submitter.retry(run_id)

    def resume_unfinished(self) -> int:
        """Embedded mode start-up: queue again the runs a previous process left queued or running."""
        return self.submitter.resume_unfinished()

    def job(self, run_id: int) -> JobView:
        return self.reader.job(run_id)

    def batch(self, batch_id: int, items: bool = True) -> BatchView:
        return self.reader.batch(batch_id, items=items)

    def job_counts(self) -> dict[str, int]:
        return self.reader.job_counts()

    # ------------------------------------------------------------------------------------------------ profiles
    def profile(self, profile_id: int) -> ProfileView:
        return self.reader.profile(profile_id)

    def curve_png(self, profile_id: int) -> bytes:
        return curve_png(self.reader.profile(profile_id))

    # ------------------------------------------------------------------------------------------------ budgets
    def stored_budget(self, document_hash: str, model: str, tolerance: float, method: str | None = None,
                      allocator: str | None = None) -> BudgetView:
        """The stored profile's budget (the inference-server look-up: one indexed query, no model, no broker)."""
        return self.budgets.stored(document_hash, model, tolerance, method, allocator)

    def predicted_budget(self, doc: DocumentInput, p: CalibrationParams, persist: bool = False,
                         prefer_profile: bool = True) -> BudgetView:
        """A stored profile when the document is calibrated at τ, else the predictor's budget (synchronous)."""
        return self.budgets.predicted(doc, p, persist=persist, prefer_profile=prefer_profile)

    # ------------------------------------------------------------------------------------------------ compress
    def compress(self, doc: DocumentInput, p: CalibrationParams, ratio: float | None = None) -> CompressedCache:
        return self.compressor.compress(doc, p, ratio)

    # ------------------------------------------------------------------------------------------------ health
    def readiness(self) -> Readiness:
        checks: dict[str, str] = {}
        try:
            check_schema(self.db)
            checks["database"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["database"] = f"unavailable: {exc}"
        if self.dispatcher is None:
            checks["broker"] = "none"
        else:
            try:
                self.dispatcher.check()
                checks["broker"] = "ok" if self.dispatcher.kind != "in-process" else "in-process"
            except Exception as exc:  # noqa: BLE001
                checks["broker"] = f"unavailable: {exc}"
        ready = all(v in ("ok", "in-process", "none") for v in checks.values())
        return Readiness(ready=ready, checks=checks,
                         execution=self.dispatcher.kind if self.dispatcher is not None else "none")
