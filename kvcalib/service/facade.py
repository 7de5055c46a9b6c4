"""The service layer's entry point: everything the HTTP routers, the Celery worker and the CLI call. Routers stay
thin (parse, call one method, serialise); ``Service`` composes small collaborators, one concept each:

* ``RequestValidator`` (``validation.py``) — parameters → ``CalibrationParams`` / ``CalibrationConfig``, documents;
* ``Submitter`` (``submission.py``) — jobs and batches written and dispatched, retries, and the sweeper
  (``sweeper.py``) that dispatches again runs whose lease expired or whose message was lost;
* ``StoreReader`` (``queries.py``) — job, batch and profile views; ``plots.curve_png`` — the curve of a profile;
* ``Budgets`` (``budgets.py``) — stored and predicted budgets, with ``Predictors`` (``predictions.py``: the predictor
  of a request — configured, registered, shipped or the fallback — its registration, the stored predictions);
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
from kvcalib.service.documents import Documents
from kvcalib.service.inputs import CalibrationParams, DocumentInput
from kvcalib.service.limits import SyncLimiter
from kvcalib.service.plots import curve_png
from kvcalib.service.predictions import Predictors
from kvcalib.service.queries import Histogram, StoreReader, profile_histograms
from kvcalib.service.runtime import EngineLoader
from kvcalib.service.submission import Submitter
from kvcalib.service.validation import RequestValidator
from kvcalib.service.views import (
    BatchView,
    BudgetView,
    CompressedCache,
    DocumentDeletion,
    JobView,
    PredictionView,
    PredictorInfo,
    PredictorListing,
    ProfileView,
    Readiness,
)

if TYPE_CHECKING:
    from kvcalib.settings import Settings


class Service:
    def __init__(self, db: Database, settings: Settings, dispatcher: Dispatcher | None = None,
                 load_engine: EngineLoader | None = None):
        from kvcalib.service.runtime import dtype_aware, get_engine

        self.db = db
        self.settings = settings
        self.dispatcher = dispatcher
        self.load_engine: EngineLoader = dtype_aware(load_engine or (
            lambda name, dtype=None, device=None: get_engine(name, device or settings.worker_device, dtype)))
        self.validator = RequestValidator(settings)
        self.reader = StoreReader(db)
        self.submitter = Submitter(db, settings, dispatcher, self.validator, self.reader)
        self.predictors = Predictors(db, settings)
        self.limiter = SyncLimiter(settings.sync_concurrency, settings.sync_queue, settings.sync_timeout)
        self.budgets = Budgets(db, self.validator, self.predictors, self.load_engine, self.limiter)
        self.compressor = Compressor(db, self.validator, self.predictors, self.load_engine, self.limiter)
        self.documents = Documents(db, settings.store_document_text)

    # ------------------------------------------------------------------------------------------------ validation
    def params(self, model: str | None = None, method: str | None = None, allocator: str | None = None,
               tolerance: float | None = None, options: dict[str, Any] | None = None,
               dtype: str | None = None, device: str | None = None) -> CalibrationParams:
        """Request parameters with the settings' defaults filled in (``dtype``: ``KVCALIB_WORKER_DTYPE``; ``device``
        None: the executing process's ``KVCALIB_WORKER_DEVICE``), validated (unknown names, a device that is not
        allowed or, where the model runs in this process, that it does not have → 422)."""
        return self.validator.params(model, method, allocator, tolerance, options, dtype, device)

    # ------------------------------------------------------------------------------------------------ jobs, batches
    def submit(self, doc: DocumentInput, p: CalibrationParams) -> tuple[JobView, bool]:
        """Create (or find) the run of a document and dispatch it. Returns (job view, finished already)."""
        out = self.submitter.submit(doc, p)
        self.documents.forget_texts()  # hash-only mode: a resubmitted finished document needs no text
        return out

    def submit_many(self, docs: Sequence[DocumentInput], p: CalibrationParams) -> list[JobView]:
        out = self.submitter.submit_many(docs, p)
        self.documents.forget_texts()
        return out

    def submit_batch(self, docs: Sequence[DocumentInput], p: CalibrationParams) -> BatchView:
        out = self.submitter.submit_batch(docs, p)
        self.documents.forget_texts()
        return out

    def retry(self, run_id: int) -> JobView:
        """Queue a failed (or stale) job again (409 for other states)."""
        return self.submitter.retry(run_id)

    def resume_unfinished(self) -> int:
        """Start-up sweep: dispatch again the runs left behind (lost messages, expired leases); how many."""
        return self.submitter.resume_unfinished()

    def start_sweeper(self) -> None:
        """Sweep for expired leases and lost messages periodically (``kvcalib.service.sweeper``, a thread)."""
        self.submitter.start_sweeper()

    def stop_sweeper(self) -> None:
        self.submitter.stop_sweeper()

    def job(self, run_id: int) -> JobView:
        view = self.reader.job(run_id)
        if view.status in ("succeeded", "failed"):
            self.documents.forget_texts(view.document_id)  # hash-only mode: its job no longer needs the text
        return view

    def batch(self, batch_id: int, items: bool = True) -> BatchView:
        view = self.reader.batch(batch_id, items=items)
        if view.done:
            self.documents.forget_texts()
        return view

    def job_counts(self) -> dict[str, int]:
        return self.reader.job_counts()

    def profile_histograms(self, r_bounds: Sequence[float], seconds_bounds: Sequence[float]
                           ) -> tuple[Histogram, Histogram]:
        """r* and calibration seconds of every stored profile (``/metrics``)."""
        return profile_histograms(self.db, r_bounds, seconds_bounds)

    # ------------------------------------------------------------------------------------------------ documents
    def delete_document(self, document_id: int) -> DocumentDeletion:
        """Delete a document, its text, runs, curves and profiles (409 while one of its jobs is unfinished)."""
        return self.documents.delete(document_id)

    def forget_texts(self) -> int:
        """Hash-only mode (``store_document_text=False``): erase the texts no unfinished job needs."""
        return self.documents.forget_texts()

    # ------------------------------------------------------------------------------------------------ profiles
    def profile(self, profile_id: int) -> ProfileView:
        return self.reader.profile(profile_id)

    def curve_png(self, profile_id: int) -> bytes:
        return curve_png(self.reader.profile(profile_id))

    # ------------------------------------------------------------------------------------------------ budgets
    def stored_budget(self, *, model: str, tolerance: float, document_hash: str | None = None,
                      ids_hash: str | None = None, method: str | None = None, allocator: str | None = None,
                      dtype: str | None = None, include_positions: bool = False) -> BudgetView:
        """The stored profile's budget of a document (``document_hash``) or of the exact context token ids
        (``ids_hash``): the inference-server look-up, one indexed query, no model, no broker."""
        return self.budgets.stored(model=model, tolerance=tolerance, document_hash=document_hash, ids_hash=ids_hash,
                                   method=method, allocator=allocator, dtype=dtype,
                                   include_positions=include_positions)

    def predicted_budget(self, doc: DocumentInput, p: CalibrationParams, persist: bool = False,
                         prefer_profile: bool = True, include_positions: bool = False) -> BudgetView:
        """A stored profile when the document is calibrated at τ, else the predictor's budget (synchronous)."""
        return self.budgets.predicted(doc, p, persist=persist, prefer_profile=prefer_profile,
                                      include_positions=include_positions)

    def token_ids_budget(self, token_ids: Sequence[int], p: CalibrationParams, prefer_profile: bool = True,
                         include_positions: bool = False) -> BudgetView:
        """The budget of exactly the token ids a server prefills: their stored profile (by ``token_ids_hash``),
        else the predictor's budget from one prefill of those ids (synchronous)."""
        return self.budgets.predicted_from_ids(token_ids, p, prefer_profile=prefer_profile,
                                               include_positions=include_positions)

    # ------------------------------------------------------------------------------------------------ predictors
    def predictor_listing(self) -> PredictorListing:
        """Shipped, configured and registered predictors, and the one serving each model by default."""
        return self.predictors.listing()

    def register_predictor(self, document: Any, model: str | None = None) -> tuple[PredictorInfo, bool]:
        """Register a predictor from its JSON object (422 with the reason when malformed); (its info, new)."""
        return self.predictors.register(document, model)

    def predictions(self, document_hash: str | None = None, model: str | None = None, method: str | None = None,
                    allocator: str | None = None, limit: int = 100) -> list[PredictionView]:
        """Stored predictions, newest first."""
        return self.predictors.predictions(document_hash=document_hash, model=model, method=method,
                                           allocator=allocator, limit=limit)

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
