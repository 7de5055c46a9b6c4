"""Budgets for inference servers: the stored profile's budget of a document (the hot path: one indexed query, no
model, no broker), or a predicted one from the document's features (synchronous, one prefill)."""

from __future__ import annotations

from kvcalib.service import repository as repo
from kvcalib.service.db import Database
from kvcalib.service.errors import NotFoundError
from kvcalib.service.inputs import CalibrationParams, DocumentInput
from kvcalib.service.limits import SyncLimiter
from kvcalib.service.predictions import Predictors, user_params_errors
from kvcalib.service.runtime import EngineLoader, model_info
from kvcalib.service.validation import RequestValidator, check_names
from kvcalib.service.views import BudgetView


class Budgets:
    def __init__(self, db: Database, validator: RequestValidator, predictors: Predictors, load_engine: EngineLoader,
                 limiter: SyncLimiter):
        self.db, self.validator, self.predictors, self.load_engine = db, validator, predictors, load_engine
        self.limiter = limiter

    def stored(self, document_hash: str, model: str, tolerance: float, method: str | None = None,
               allocator: str | None = None) -> BudgetView:
        """The stored profile's budget, else a 404 saying which tolerances exist and how to get this one."""
        check_names(model, method, allocator)
        with self.db.engine.connect() as conn:  # Core, no ORM session: this is the inference servers' hot path
            view = repo.find_budget(conn, content_hash=document_hash, model_name=model, tolerance=tolerance,
                                    method=method, allocator=allocator)
        if view is not None:
            return view
        with self.db.session() as s:
            others = repo.profile_tolerances(s, content_hash=document_hash, model_name=model)
        hint = (f"no calibrated profile for document {document_hash} under model {model!r} at tolerance {tolerance:g}"
                + (f" (method {method})" if method else "") + (f" (allocator {allocator})" if allocator else ""))
        if others:
            hint += f"; profiles exist at tolerance {others}"
        hint += ": POST /calibrate with mode=full to calibrate it, or POST /budget with the text for a predicted budget"
        raise NotFoundError(hint)

    def predicted(self, doc: DocumentInput, p: CalibrationParams, persist: bool = False,
                  prefer_profile: bool = True) -> BudgetView:
        """A stored profile when the document is calibrated at τ (``prefer_profile``), else the predictor's
        budget (synchronous), stored in ``predictions`` (by the document's hash: also when the document itself is not
        stored). ``persist`` stores the document (its text unless in hash-only mode)."""
        from kvcalib.calib.calibration.calibrate import predict

        config = self.validator.config(p)
        info = model_info(p.model)
        with self.db.session() as s:
            resolved = self.validator.document(s, doc, info, persist=persist,
                                              keep_text=False)  # hash-only mode: never the text
            if prefer_profile:
                view = repo.find_budget(s, content_hash=resolved.content_hash, model_name=info.name,
                                        tolerance=p.tolerance, method=p.method, allocator=p.allocator)
                if view is not None:
                    return view
        predictor = self.predictors.for_request(config, p)

        def work():
            engine = self.load_engine(p.model)
            with user_params_errors(p):
                return predict(engine, resolved.text, config, predictor)

        pred = self.limiter.run(work)  # 429 past the concurrency cap, 503 past the time limit
        version = pred.predictor_version or predictor.version
        self.predictors.store(content_hash=resolved.content_hash, model=info.name, model_revision=info.revision,
                              config=config, ratio=float(pred.ratio), token_budget=int(pred.token_budget),
                              context_tokens=int(pred.context_tokens), predictor=predictor,
                              predictor_version=version, features=pred.features)
        return BudgetView(source="predicted", document_hash=resolved.content_hash, model=info.name,
                          model_revision=info.revision, method=p.method, allocator=p.allocator,
                          tolerance=p.tolerance, ratio=float(pred.ratio), token_budget=int(pred.token_budget),
                          context_tokens=int(pred.context_tokens),
                          layer_budgets=[int(x) for x in pred.layer_budgets],
                          head_budgets=[[int(x) for x in row] for row in pred.head_budgets],
                          profile_id=None, predictor_version=version,
                          document_id=resolved.row.id if resolved.row is not None else None,
                          features=repo.jsonable(pred.features))
