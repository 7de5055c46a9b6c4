"""The service layer: everything the HTTP routers, the Celery worker and the CLI call. Routers stay thin (parse,
call one method, serialise); this module validates input, talks to the profile store, dispatches jobs and runs the
synchronous computations (predict, compress).

Jobs are dispatched through a ``Dispatcher`` given at construction — ``jobs.InProcessDispatcher`` (embedded) or
``kvcalib.worker.dispatch.CeleryDispatcher`` — so this package never imports the API or the worker.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvcalib.calib.data.documents import content_hash
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.data.jsonl import iter_jsonl
from kvcalib.service import repository as repo
from kvcalib.service.db import Database, check_schema
from kvcalib.service.runtime import ModelInfo, check_model_name, model_info
from kvcalib.service.errors import (ConflictError, NotFoundError, ServiceInputError, TooLargeError,
                                        UnavailableError)
from kvcalib.service.orm import CalibrationRun, Profile, RunStatus, utcnow

log = logging.getLogger("kvcalib.service")

CONTEXT_RESERVE = 512  # tokens kept free of the model's context for the chat template, probes and questions


class Dispatcher(Protocol):
    kind: str

    def check(self) -> None: ...  # raise UnavailableError when jobs cannot be accepted

    def submit(self, run_id: int) -> str | None: ...  # a task id

    def close(self, wait: bool = False) -> None: ...


@dataclass
class DocumentInput:
    """One document of a request: its text, or a reference to a stored document."""

    text: str | None = None
    document_id: int | None = None
    document_hash: str | None = None
    source: str | None = None


@dataclass
class CalibrationParams:
    model: str
    method: str
    allocator: str
    tolerance: float
    options: dict[str, Any] = field(default_factory=dict)  # CalibrationConfig overrides (ratios, n_probes, …)


def validate_text(text: str, max_bytes: int) -> bytes:
    """UTF-8 bytes of a document, or a clear input error (empty, lone surrogates, NUL characters, too large)."""
    if not isinstance(text, str):
        raise ServiceInputError("document text must be a string")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ServiceInputError(f"document text is not valid Unicode (UTF-8 encoding fails at {exc.start})") from exc
    if len(data) > max_bytes:
        raise TooLargeError(f"document is {len(data)} bytes, over the limit of {max_bytes} bytes "
                            "(KVCALIB_MAX_DOCUMENT_BYTES)")
    if "\x00" in text:
        raise ServiceInputError("document text contains NUL characters")
    if not text.strip():
        raise ServiceInputError("document text is empty")
    return data


def decode_utf8(data: bytes, what: str = "upload") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ServiceInputError(f"{what} is not valid UTF-8 (invalid byte at offset {exc.start})") from exc


def parse_jsonl(text: str, max_documents: int) -> list[DocumentInput]:
    """Documents of a JSONL corpus: one JSON object per line (``text`` or ``document_id``/``document_hash``, optional
    ``source``/``id``) or one JSON string per line; blank lines are skipped. Errors name the line."""
    docs: list[DocumentInput] = []
    for no, obj in iter_jsonl(text.splitlines(), lambda no, msg: ServiceInputError(f"line {no}: {msg}")):
        if isinstance(obj, str):
            docs.append(DocumentInput(text=obj))
        elif isinstance(obj, dict):
            t = obj.get("text")
            did, dh = obj.get("document_id"), obj.get("document_hash")
            src = obj.get("source", obj.get("id"))
            if t is not None and not isinstance(t, str):
                raise ServiceInputError(f"line {no}: `text` must be a string")
            if did is not None and (not isinstance(did, int) or isinstance(did, bool) or did < 1):
                raise ServiceInputError(f"line {no}: `document_id` must be a positive integer")
            if dh is not None and not isinstance(dh, str):
                raise ServiceInputError(f"line {no}: `document_hash` must be a string")
            docs.append(DocumentInput(text=t, document_id=did, document_hash=dh,
                                      source=None if src is None else str(src)[:1000]))
        else:
            raise ServiceInputError(f"line {no}: expected a JSON object or string")
        if len(docs) > max_documents:
            raise TooLargeError(f"a batch holds at most {max_documents} documents (KVCALIB_MAX_BATCH_DOCUMENTS)")
    if not docs:
        raise ServiceInputError("the corpus holds no documents")
    return docs


class Service:
    def __init__(self, db: Database, settings, dispatcher: Dispatcher | None = None,
                 load_engine: Callable[[str], object] | None = None):
        from kvcalib.service.runtime import get_engine

        self.db = db
        self.settings = settings
        self.dispatcher = dispatcher
        self.load_engine = load_engine or (lambda name: get_engine(name, settings.worker_device))
        self._predictor_lock = threading.Lock()
        self._predictor_cache: dict[str, object] = {}

    # ------------------------------------------------------------------------------------------------ validation
    def params(self, model: str | None = None, method: str | None = None, allocator: str | None = None,
               tolerance: float | None = None, options: dict | None = None) -> CalibrationParams:
        s = self.settings
        p = CalibrationParams(model=model or s.default_model, method=method or s.default_method,
                              allocator=allocator or s.default_allocator,
                              tolerance=s.default_tolerance if tolerance is None else float(tolerance),
                              options={k: v for k, v in (options or {}).items() if v is not None})
        self._check_names(p.model, p.method, p.allocator)
        if not 0.0 < p.tolerance <= 1.0:
            raise ServiceInputError(f"tolerance must be in (0, 1], got {p.tolerance}")
        return p

    @staticmethod
    def _check_names(model: str, method: str | None, allocator: str | None) -> None:
        """Name validation only (no model loading): unknown names are a 422 listing the valid choices."""
        from kvcalib.calib.budget import available_allocators
        from kvcalib.calib.scorers import UnknownMethodError, available_methods

        check_model_name(model)
        if method is not None and method not in available_methods():
            raise UnknownMethodError(f"unknown method {method!r}: expected one of {available_methods()}")
        if allocator is not None and allocator not in available_allocators():
            raise ServiceInputError(f"unknown allocator {allocator!r}: expected one of {available_allocators()}")

    def config(self, p: CalibrationParams):
        """The validated ``CalibrationConfig`` of request parameters (its errors are KvcalibErrors → 422)."""
        from kvcalib.calib.calibration.calibrate import CalibrationConfig

        d = dict(p.options)
        d.update(method=p.method, allocator=p.allocator, tolerance=p.tolerance)
        _check_method_params(p.method, d.get("method_params") or {})
        if "ratios" in d and d["ratios"] is not None:
            d["ratios"] = tuple(sorted({float(r) for r in d["ratios"]}))
        try:
            return CalibrationConfig.from_dict(d)
        except KvcalibError:
            raise
        except (TypeError, ValueError) as exc:
            raise ServiceInputError(f"invalid calibration options: {exc}") from exc

    def token_limit(self, info: ModelInfo) -> int:
        return max(1, min(self.settings.max_document_tokens, info.max_positions - CONTEXT_RESERVE))

    def _check_tokens(self, text: str, info: ModelInfo) -> int:
        n = info.count_tokens(text)
        limit = self.token_limit(info)
        if n > limit:
            raise TooLargeError(f"document is {n} tokens long for model {info.name!r}, over the limit of {limit} "
                                f"tokens (KVCALIB_MAX_DOCUMENT_TOKENS, and the model's context of "
                                f"{info.max_positions} minus {CONTEXT_RESERVE} reserved)")
        return n

    def _document(self, s, doc: DocumentInput, info: ModelInfo, persist: bool = True):
        """(document row or None, text, content hash, token count) of a request's document."""
        given = [x is not None for x in (doc.text, doc.document_id, doc.document_hash)]
        if sum(given) != 1:
            raise ServiceInputError("give exactly one of `text`, `document_id` or `document_hash`")
        if doc.text is not None:
            validate_text(doc.text, self.settings.max_document_bytes)
            n = self._check_tokens(doc.text, info)
            h = content_hash(doc.text)
            row = repo.get_or_create_document(s, doc.text, h, doc.source, n) if persist else \
                repo.get_document_by_hash(s, h)
            return row, doc.text, h, n
        row = (repo.get_document(s, doc.document_id) if doc.document_id is not None
               else repo.get_document_by_hash(s, doc.document_hash))
        if row is None:
            ref = f"id {doc.document_id}" if doc.document_id is not None else f"hash {doc.document_hash}"
            raise NotFoundError(f"no stored document with {ref}: send its `text` instead")
        n = self._check_tokens(row.text, info)
        return row, row.text, row.content_hash, n

    # ------------------------------------------------------------------------------------------------ full (jobs)
    def submit(self, doc: DocumentInput, p: CalibrationParams) -> tuple[dict, bool]:
        """Create (or find) the run of a document and dispatch it. Returns (job view, finished already)."""
        views = self.submit_many([doc], p)
        view = views[0]
        return view, view["status"] == RunStatus.succeeded.value

    def submit_many(self, docs: Sequence[DocumentInput], p: CalibrationParams, batch: bool = False
                    ) -> list[dict] | tuple[int, list[dict]]:
        if self.dispatcher is None:
            raise UnavailableError("this process has no job executor")
        config = self.config(p)
        info = model_info(p.model)
        self.dispatcher.check()  # a down broker answers 503 before anything is written
        params, phash = config.to_dict(), config.params_hash()
        to_dispatch: list[int] = []
        run_ids: list[int] = []
        with self.db.session() as s:
            model_row = repo.get_or_create_model(s, info.name, info.revision)
            for i, d in enumerate(docs):
                try:
                    row, _, _, _ = self._document(s, d, info)
                except KvcalibError as exc:
                    if len(docs) > 1:
                        raise type(exc)(f"document {i}: {exc}") from exc
                    raise
                run, created = repo.get_or_create_run(s, row, model_row, params, phash, p.method, p.allocator,
                                                      p.tolerance)
                run_ids.append(run.id)
                if created:
                    to_dispatch.append(run.id)
                elif run.status == RunStatus.failed.value or self._stale(run):
                    repo.requeue_run(s, run)
                    to_dispatch.append(run.id)
            batch_id = None
            if batch:
                batch_id = repo.create_batch(s, run_ids, {"model": p.model, "method": p.method,
                                                         "allocator": p.allocator, "tolerance": p.tolerance,
                                                         "options": p.options}).id
        for run_id in dict.fromkeys(to_dispatch):
            self._dispatch(run_id)
        with self.db.session() as s:
            views = [self._job_view(s, repo.get_run(s, r)) for r in run_ids]
        return (batch_id, views) if batch else views

    def _stale(self, run: CalibrationRun) -> bool:
        """A queued/running run untouched for longer than the broker's visibility timeout lost its message."""
        if run.status not in (RunStatus.queued.value, RunStatus.running.value):
            return False
        updated = run.updated_at
        if updated.tzinfo is None:
            updated = updated.replace(tzinfo=utcnow().tzinfo)
        return (utcnow() - updated).total_seconds() > self.settings.broker_visibility_timeout

    def _dispatch(self, run_id: int) -> None:
        try:
            task_id = self.dispatcher.submit(run_id)
        except Exception as exc:  # noqa: BLE001 - broker down between check and submit
            with self.db.session() as s:
                repo.set_run(s, run_id, status=RunStatus.failed.value, message="could not be queued",
                             error=f"job queue unavailable: {exc}", finished_at=utcnow())
            raise UnavailableError(f"the job queue is unavailable ({type(exc).__name__}: {exc}); "
                                   "resubmit later — the failed job is retried on resubmission") from exc
        if task_id:
            with self.db.session() as s:
                repo.set_run(s, run_id, task_id=task_id)

    def retry(self, run_id: int) -> dict:
        if self.dispatcher is None:
            raise UnavailableError("this process has no job executor")
        self.dispatcher.check()
        with self.db.session() as s:
            run = repo.get_run(s, run_id)
            if run is None:
                raise NotFoundError(f"no job {run_id}")
            if run.status == RunStatus.succeeded.value:
                raise ConflictError(f"job {run_id} already succeeded")
            if run.status != RunStatus.failed.value and not self._stale(run):
                raise ConflictError(f"job {run_id} is {run.status}; only failed (or stale) jobs can be retried")
            repo.requeue_run(s, run)
        self._dispatch(run_id)
        return self.job(run_id)

    def resume_unfinished(self) -> int:
        """Embedded mode start-up: queue again the runs a previous process left queued or running."""
        with self.db.session() as s:
            ids = repo.unfinished_runs(s)
            for r in ids:
                repo.set_run(s, r, status=RunStatus.queued.value, message="resumed after restart")
        for r in ids:
            self.dispatcher.submit(r)
        return len(ids)

    def job(self, run_id: int) -> dict:
        with self.db.session() as s:
            run = repo.get_run(s, run_id)
            if run is None:
                raise NotFoundError(f"no job {run_id}")
            return self._job_view(s, run)

    def _job_view(self, s, run: CalibrationRun) -> dict:
        prof = repo.profile_for_run(s, run.id) if run.status == RunStatus.succeeded.value else None
        return {
            "id": run.id, "status": run.status, "progress": 1.0 if prof else float(run.progress),
            "message": run.message, "error": run.error, "attempts": run.attempts,
            "document_id": run.document_id, "document_hash": run.document.content_hash,
            "model": run.model.name, "model_revision": run.model.revision, "method": run.method,
            "allocator": run.allocator, "tolerance": run.tolerance, "params_hash": run.params_hash,
            "params": run.params, "created_at": run.created_at, "updated_at": run.updated_at,
            "started_at": run.started_at, "finished_at": run.finished_at,
            "result": self._profile_summary(prof) if prof else None,
        }

    @staticmethod
    def _profile_summary(p: Profile) -> dict:
        return {"profile_id": p.id, "r_star": p.r_star, "token_budget": p.token_budget,
                "context_tokens": p.context_tokens, "monotone": p.monotone, "seconds": p.seconds}

    # ------------------------------------------------------------------------------------------------ batches
    def submit_batch(self, docs: Sequence[DocumentInput], p: CalibrationParams) -> dict:
        if not docs:
            raise ServiceInputError("a batch needs at least one document")
        if len(docs) > self.settings.max_batch_documents:
            raise TooLargeError(f"a batch holds at most {self.settings.max_batch_documents} documents, "
                                f"got {len(docs)} (KVCALIB_MAX_BATCH_DOCUMENTS)")
        batch_id, _ = self.submit_many(docs, p, batch=True)
        return self.batch(batch_id)

    def batch(self, batch_id: int, items: bool = True) -> dict:
        with self.db.session() as s:
            b = repo.get_batch(s, batch_id)
            if b is None:
                raise NotFoundError(f"no batch {batch_id}")
            rows = repo.batch_rows(s, batch_id)
        counts = {st.value: 0 for st in RunStatus}
        for _, _, status, *_ in rows:
            counts[status] = counts.get(status, 0) + 1
        total = len(rows)
        progress = sum(1.0 if st in (RunStatus.succeeded.value, RunStatus.failed.value) else float(pr)
                       for _, _, st, pr, *_ in rows) / total if total else 1.0
        done = counts[RunStatus.succeeded.value] + counts[RunStatus.failed.value] == total
        return {
            "id": b.id, "total": total, "counts": counts, "progress": progress, "done": done,
            "status": ("succeeded" if counts["succeeded"] == total else "finished_with_errors") if done
            else ("running" if counts["running"] or counts["succeeded"] or counts["failed"] else "queued"),
            "params": b.params, "created_at": b.created_at,
            "items": [{"position": pos, "job_id": rid, "status": st, "progress": 1.0 if pid else float(pr),
                       "error": err, "profile_id": pid, "document_hash": h}
                      for pos, rid, st, pr, err, pid, h in rows] if items else None,
        }

    # ------------------------------------------------------------------------------------------------ profiles
    def profile(self, profile_id: int) -> dict:
        with self.db.session() as s:
            p = repo.get_profile(s, profile_id)
            if p is None:
                raise NotFoundError(f"no profile {profile_id}")
            points = repo.curve_points(s, p.run_id)
            return {
                "id": p.id, "job_id": p.run_id, "document_id": p.document_id,
                "document_hash": p.document.content_hash, "model": p.model.name, "model_revision": p.model.revision,
                "method": p.method, "allocator": p.allocator, "tolerance": p.tolerance, "r_star": p.r_star,
                "token_budget": p.token_budget, "context_tokens": p.context_tokens, "monotone": p.monotone,
                "layer_budgets": p.layer_budgets, "head_budgets": p.head_budgets, "features": p.features,
                "predictor_version": p.predictor_version, "seconds": p.seconds, "created_at": p.created_at,
                "params": p.run.params,
                "curve": [{"ratio": c.ratio, "fidelity": c.fidelity, "kl": c.kl} for c in points],
            }

    def curve_png(self, profile_id: int) -> bytes:
        prof = self.profile(profile_id)
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 3.4), dpi=100)
        ax = fig.subplots()
        xs = [c["ratio"] for c in prof["curve"]]
        ax.plot(xs, [c["fidelity"] for c in prof["curve"]], "o-", label="fidelity")
        ax.axhline(prof["tolerance"], color="grey", ls="--", lw=1, label=f"τ = {prof['tolerance']:g}")
        ax.axvline(prof["r_star"], color="tab:red", ls=":", lw=1.5, label=f"r* = {prof['r_star']:.2f}")
        ax.set_xlabel("compression ratio")
        ax.set_ylabel("fidelity")
        ax.set_xlim(0, 1)
        ax.set_title(f"{prof['document_hash'][:12]} · {prof['model']} · {prof['method']}/{prof['allocator']}",
                     fontsize=9)
        ax.legend(fontsize=8, loc="lower left")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    # ------------------------------------------------------------------------------------------------ budgets
    def stored_budget(self, document_hash: str, model: str, tolerance: float, method: str | None = None,
                      allocator: str | None = None) -> dict:
        """The stored profile's budget (the inference-server look-up: one indexed query, no model, no broker)."""
        self._check_names(model, method, allocator)
        with self.db.engine.connect() as conn:  # Core, no ORM session: this is the inference servers' hot path
            view = repo.find_budget(conn, document_hash, model, tolerance, method, allocator)
        if view is not None:
            return view
        with self.db.session() as s:
            others = repo.profile_tolerances(s, document_hash, model)
        hint = (f"no calibrated profile for document {document_hash} under model {model!r} at tolerance {tolerance:g}"
                + (f" (method {method})" if method else "") + (f" (allocator {allocator})" if allocator else ""))
        if others:
            hint += f"; profiles exist at tolerance {others}"
        hint += ": POST /calibrate with mode=full to calibrate it, or POST /budget with the text for a predicted budget"
        raise NotFoundError(hint)

    def predicted_budget(self, doc: DocumentInput, p: CalibrationParams, persist: bool = False,
                         prefer_profile: bool = True) -> dict:
        """A stored profile when the document is calibrated at τ, else the predictor's budget (synchronous)."""
        config = self.config(p)
        info = model_info(p.model)
        with self.db.session() as s:
            row, text, h, n = self._document(s, doc, info, persist=persist)
            if prefer_profile:
                view = repo.find_budget(s, h, info.name, p.tolerance, p.method, p.allocator)
                if view is not None:
                    return view
        pred, version = self._predict(text, config, p)
        return {"source": "predicted", "document_hash": h, "model": info.name, "model_revision": info.revision,
                "method": p.method, "allocator": p.allocator, "tolerance": p.tolerance, "ratio": float(pred.ratio),
                "token_budget": int(pred.token_budget), "context_tokens": int(pred.context_tokens),
                "layer_budgets": [int(x) for x in pred.layer_budgets],
                "head_budgets": [[int(x) for x in row] for row in pred.head_budgets],
                "profile_id": None, "predictor_version": pred.predictor_version or version,
                "document_id": row.id if row is not None else None, "features": repo._jsonable(pred.features)}

    def _predict(self, text: str, config, p: CalibrationParams):
        from kvcalib.calib.calibration.calibrate import predict

        engine = self.load_engine(p.model)
        predictor = self._predictor_for(config, p)
        with _user_params_errors(p):
            pred = predict(engine, text, config, predictor)
        return pred, getattr(predictor, "version", None)

    def _predictor_for(self, config, p: CalibrationParams):
        predictor = self.predictor()
        if predictor is None or not _predictor_fits(predictor, config):
            predictor = self.fallback_predictor(p)
        return predictor

    def predictor(self):
        """The configured predictor: ``predictor_path``, else the newest one registered in the database, else None
        (``calibrate.predict`` then uses its documented fallback)."""
        path = self.settings.predictor_path
        if path is None:
            try:
                with self.db.session() as s:
                    row = repo.latest_predictor(s)
                    path = row.artefact_path if row is not None else None
            except Exception:  # noqa: BLE001
                path = None
        if path is None:
            return None
        key = str(path)
        with self._predictor_lock:
            if key not in self._predictor_cache:
                from kvcalib.calib.predictors import load_predictor

                pred = load_predictor(path)
                try:  # the predictors table records every predictor this deployment served with
                    with self.db.session() as s:
                        repo.register_predictor(s, pred.version, getattr(pred, "metrics", {}) or {}, key,
                                                getattr(pred, "kind", None))
                except Exception:  # noqa: BLE001 - bookkeeping only
                    log.warning("could not register predictor %s", key, exc_info=True)
                self._predictor_cache[key] = pred
            return self._predictor_cache[key]

    def fallback_predictor(self, p: CalibrationParams) -> "FallbackPredictor":
        """No (fitting) trained predictor: the median r* of the stored profiles of the same model, method,
        allocator and τ (an empirical prior of this deployment), else Compactor's parametric curve with neutral
        parameters (b = 0: fidelity = retention, hence r = 1 − τ)."""
        with self.db.session() as s:
            values = repo.stored_r_stars(s, p.model, p.method, p.allocator, p.tolerance)
        return FallbackPredictor(values, p.tolerance)

    # ------------------------------------------------------------------------------------------------ compress
    def compress(self, doc: DocumentInput, p: CalibrationParams, ratio: float | None = None) -> tuple[bytes, dict]:
        """Compress the document's KV cache at ``ratio`` (else the stored profile's budgets at τ, else the
        predicted ratio) and serialise it as safetensors (``calib.export``)."""
        import torch

        from kvcalib.calib.budget import select_topk
        from kvcalib.calib.cache.ragged import RaggedKVCache
        from kvcalib.calib.calibration.calibrate import budgets_at, featurize
        from kvcalib.calib.cache.export import cache_to_safetensors

        config = self.config(p)
        info = model_info(p.model)
        with self.db.session() as s:
            row, text, h, n = self._document(s, doc, info, persist=True)
            prof_view = None if ratio is not None else repo.find_budget(s, h, info.name, p.tolerance, p.method,
                                                                        p.allocator)
            doc_id = row.id
        engine = self.load_engine(p.model)
        with _user_params_errors(p):
            feats, cap, scores = featurize(engine, text, config)
            source = "ratio"
            counts = None
            if ratio is None and prof_view is not None:
                ratio, source = float(prof_view["ratio"]), "profile"
                if len(prof_view["head_budgets"]) == scores.shape[0] and \
                        prof_view["context_tokens"] == scores.shape[-1]:
                    counts = torch.tensor(prof_view["head_budgets"], dtype=torch.long)  # the stored budgets
            elif ratio is None:  # the prediction from the features just computed (no second prefill)
                predictor = self._predictor_for(config, p)
                r = float(predictor.predict([feats])[0])
                ratio, source = min(max(r, 0.0), max(config.ratios), 0.999), "predicted"
            if counts is None:
                _, head_budgets = budgets_at(scores, ratio, p.allocator)
                counts = torch.as_tensor(head_budgets, dtype=torch.long)
            keep = select_topk(scores, counts)
            cache = RaggedKVCache.from_mask(cap.keys, cap.values, keep)
        meta = {"model": info.name, "model_revision": info.revision, "method": p.method, "allocator": p.allocator,
                "tolerance": p.tolerance, "ratio": f"{float(ratio):.6f}", "budget_source": source,
                "document_hash": h, "document_id": doc_id}
        data = cache_to_safetensors(cache, cap.input_ids, meta)
        achieved = 1.0 - float(keep.float().mean())
        return data, {**meta, "achieved_ratio": achieved, "context_tokens": int(cap.num_tokens)}

    # ------------------------------------------------------------------------------------------------ health
    def readiness(self) -> dict:
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
        return {"ready": ready, "checks": checks}

    def job_counts(self) -> dict[str, int]:
        with self.db.session() as s:
            return repo.run_counts(s)


def _check_method_params(method: str, params: dict) -> None:
    """Method hyperparameters must have the type of their default (a string where an int is expected would only
    fail later, inside a worker)."""
    import math

    from kvcalib.calib.scorers import SCORERS, UnknownMethodError

    if not isinstance(params, dict):
        raise ServiceInputError("method_params must be an object")
    cls = SCORERS.get(method)
    if cls is None:
        return
    defaults = cls().params()
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise UnknownMethodError(f"unknown parameter(s) {unknown} for method {method!r}: expected {sorted(defaults)}")
    for k, v in params.items():
        d = defaults[k]
        if isinstance(d, bool):
            ok = isinstance(v, bool)
        elif isinstance(d, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(d, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        elif isinstance(d, str):
            ok = isinstance(v, str)
        else:
            ok = True
        if not ok:
            raise ServiceInputError(f"method parameter {k!r} of {method!r} must be a {type(d).__name__} "
                                    f"(default {d!r}), got {v!r}")


def _predictor_fits(predictor, config) -> bool:
    """A trained predictor only answers for the (method, allocator, τ) it was trained on."""
    try:
        trained = predictor.training_config() or {}
    except Exception:  # noqa: BLE001
        return True
    return all(trained[k] == getattr(config, k) for k in ("method", "allocator", "tolerance") if k in trained)


class FallbackPredictor:
    """The documented fallback (duck-types ``calib.predictors.Predictor``: ``version``, ``metrics``,
    ``training_config()``, ``predict(features)``): the median stored r* for the request's (model, method, allocator,
    τ); with no stored profile, ``ParametricPredictor`` (Compactor's curve) with b = 0, i.e. r = 1 − τ."""

    def __init__(self, r_stars: Sequence[float], tolerance: float):
        import statistics

        self.n = len(r_stars)
        if self.n:
            self.value = float(statistics.median(r_stars))
            self.version = f"fallback-store-median-n{self.n}"
        else:
            from kvcalib.calib.predictors import ParametricPredictor

            self.value = float(ParametricPredictor(alpha=0.0, beta=0.0, tau=tolerance).ratio_for_nll([0.0])[0])
            self.version = "fallback-parametric-b0"
        self.metrics = {"n_profiles": self.n, "ratio": self.value}

    def training_config(self) -> dict:
        return {}

    def predict(self, features) -> list[float]:
        return [self.value for _ in features]


class _user_params_errors:
    """Computations run with caller-chosen method parameters: their failures are input errors (422), not 500s."""

    def __init__(self, p: CalibrationParams):
        self.custom = bool(p.options.get("method_params"))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, KvcalibError) or not self.custom:
            return False
        if isinstance(exc, (ValueError, TypeError, ZeroDivisionError, RuntimeError, IndexError)):
            raise ServiceInputError(f"calibration failed with the given method_params: {type(exc).__name__}: "
                                    f"{exc}") from exc
        return False
