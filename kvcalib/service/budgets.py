"""Budgets for inference servers: the stored profile's budget of a document or of the exact context token ids a
server prefills (the hot path: one indexed query, no model, no broker), or a predicted one from the document's — or
the token ids' — features (synchronous, one prefill). Every budget carries the model shape in its dtype, the prompt
format its ids follow and, when asked, the kept positions (``kvcalib.service.layout``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from kvcalib.service import repository as repo
from kvcalib.service.db import Database
from kvcalib.service.errors import NotFoundError, ServiceInputError
from kvcalib.service.inputs import CalibrationParams, DocumentInput, check_document_hash
from kvcalib.service.limits import SyncLimiter
from kvcalib.service.predictions import Predictors, user_params_errors
from kvcalib.service.runtime import EngineLoader, load_at, model_config, model_info
from kvcalib.service.validation import RequestValidator, check_dtype, check_names, check_token_ids
from kvcalib.service.views import BudgetView, ModelShapeView, PromptFormatView


def check_ids_hash(value: object) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ServiceInputError("`ids_hash` must be the SHA-256 of the model name and the token ids "
                                "(token_ids_hash): 64 lowercase hex digits")
    return value


class Budgets:
    def __init__(self, db: Database, validator: RequestValidator, predictors: Predictors, load_engine: EngineLoader,
                 limiter: SyncLimiter):
        self.db, self.validator, self.predictors, self.load_engine = db, validator, predictors, load_engine
        self.limiter = limiter

    # ------------------------------------------------------------------------------------------------ stored
    def stored(self, *, model: str, tolerance: float, document_hash: str | None = None, ids_hash: str | None = None,
               method: str | None = None, allocator: str | None = None, dtype: str | None = None,
               include_positions: bool = False) -> BudgetView:
        """The stored profile's budget of a document (``document_hash``) or of the exact context token ids
        (``ids_hash``, exactly one of the two), else a 404 saying which tolerances exist and how to get this one."""
        if (document_hash is None) == (ids_hash is None):
            raise ServiceInputError("give exactly one of `document_hash` (SHA-256 of the document text) or "
                                    "`ids_hash` (token_ids_hash of the model name and the context token ids)")
        if document_hash is not None:
            check_document_hash(document_hash)
        else:
            check_ids_hash(ids_hash)
        check_names(model, method, allocator)
        if dtype is not None:
            check_dtype(dtype)
        with self.db.engine.connect() as conn:  # Core, no ORM session: this is the inference servers' hot path
            view = repo.find_budget(conn, content_hash=document_hash, ids_hash=ids_hash, model_name=model,
                                    tolerance=tolerance, method=method, allocator=allocator, dtype=dtype,
                                    include_positions=include_positions)
        if view is not None:
            return completed(view, include_positions)
        if ids_hash is not None:
            raise NotFoundError(
                f"no calibrated profile for token ids {ids_hash} under model {model!r} at tolerance {tolerance:g}"
                + (f" (method {method})" if method else "") + (f" (allocator {allocator})" if allocator else "")
                + (f" (dtype {dtype})" if dtype else "")
                + ": the ids must be kvcalib's prompt of a calibrated document (its profile's `prompt_format`); "
                  "POST /budget with the `token_ids` for a predicted budget")
        with self.db.session() as s:
            others = repo.profile_tolerances(s, content_hash=document_hash, model_name=model)
        hint = (f"no calibrated profile for document {document_hash} under model {model!r} at tolerance {tolerance:g}"
                + (f" (method {method})" if method else "") + (f" (allocator {allocator})" if allocator else "")
                + (f" (dtype {dtype})" if dtype else ""))
        if others:
            hint += f"; profiles exist at tolerance {others}"
        hint += ": POST /calibrate with mode=full to calibrate it, or POST /budget with the text for a predicted budget"
        raise NotFoundError(hint)

    # ------------------------------------------------------------------------------------------------ predicted
    def predicted(self, doc: DocumentInput, p: CalibrationParams, persist: bool = False,
                  prefer_profile: bool = True, include_positions: bool = False) -> BudgetView:
        """A stored profile when the document is calibrated at τ (``prefer_profile``), else the predictor's
        budget (synchronous), stored in ``predictions`` (by the document's hash: also when the document itself is not
        stored). ``persist`` stores the document (its text unless in hash-only mode)."""
        self.validator.check_local_device(p)  # the model would run here: a device this process lacks is a 422
        config = self.validator.config(p)
        info = model_info(p.model)
        with self.db.session() as s:
            resolved = self.validator.document(s, doc, info, persist=persist,
                                              keep_text=False)  # hash-only mode: never the text
            if prefer_profile:
                view = repo.find_budget(s, content_hash=resolved.content_hash, model_name=info.name,
                                        tolerance=p.tolerance, method=p.method, allocator=p.allocator,
                                        dtype=p.dtype, include_positions=include_positions)
                if view is not None:
                    return completed(view, include_positions)
        return self._predict(p, config, content_hash=resolved.content_hash, text=resolved.text,
                             document_id=resolved.row.id if resolved.row is not None else None,
                             include_positions=include_positions)

    def predicted_from_ids(self, token_ids: Sequence[int], p: CalibrationParams, prefer_profile: bool = True,
                           include_positions: bool = False) -> BudgetView:
        """The budget of exactly ``token_ids`` (what a server prefills): the stored profile whose context ids they
        are (by ``token_ids_hash``), else the predictor's budget from one prefill of exactly those ids (prompt
        format ``token_ids``), stored in ``predictions`` under the ids' hash. The ids must be integers in the
        model's vocabulary, within the text path's token limit."""
        from kvcalib.calib.integrations.servers import token_ids_hash

        self.validator.check_local_device(p)
        config = self.validator.config(p)
        info = model_info(p.model)
        ids = check_token_ids(token_ids, info, self.validator.token_limit(info))
        h = token_ids_hash(info.name, ids)
        if prefer_profile:
            with self.db.engine.connect() as conn:
                view = repo.find_budget(conn, ids_hash=h, model_name=info.name, tolerance=p.tolerance,
                                        method=p.method, allocator=p.allocator, dtype=p.dtype,
                                        include_positions=include_positions)
            if view is not None:
                return completed(view, include_positions)
        return self._predict(p, config, content_hash=None, token_ids=ids, include_positions=include_positions)

    def _predict(self, p: CalibrationParams, config, *, content_hash: str | None, text: str | None = None,
                 token_ids: list[int] | None = None, document_id: int | None = None,
                 include_positions: bool = False) -> BudgetView:
        from kvcalib.service.layout import predict_with_layout

        info = model_info(p.model)
        predictor = self.predictors.for_request(config, p)

        def work():
            engine = load_at(self.load_engine, p.model, p.dtype, p.device)
            with user_params_errors(p):
                return predict_with_layout(engine, config, predictor, model=info.name, text=text,
                                           token_ids=token_ids)

        pred = self.limiter.run(work)  # 429 past the concurrency cap, 503 past the time limit
        layout = pred.layout
        self.predictors.store(content_hash=content_hash or layout.ids_hash, model=info.name,
                              model_revision=info.revision, config=config, ratio=pred.ratio,
                              token_budget=pred.token_budget, context_tokens=pred.context_tokens,
                              predictor=predictor, predictor_version=pred.predictor_version, features=pred.features,
                              ids_hash=layout.ids_hash, dtype=layout.dtype)
        return BudgetView(source="predicted", document_hash=content_hash, model=info.name,
                          model_revision=info.revision, method=p.method, allocator=p.allocator,
                          tolerance=p.tolerance, ratio=pred.ratio, token_budget=pred.token_budget,
                          context_tokens=pred.context_tokens, layer_budgets=pred.layer_budgets,
                          head_budgets=pred.head_budgets, profile_id=None,
                          predictor_version=pred.predictor_version, document_id=document_id,
                          features=repo.jsonable(pred.features), ids_hash=layout.ids_hash, dtype=layout.dtype,
                          model_shape=layout.shape_view, prompt_format=layout.format_view,
                          kept_positions=layout.kept_positions if include_positions else None)


def completed(view: BudgetView, include_positions: bool) -> BudgetView:
    """A stored budget with its model shape and prompt format also for profiles from before migration 0004 (the
    shape from the model's config.json in the row's dtype; the format without ids hash and document start)."""
    shape, fmt = view.model_shape, view.prompt_format
    if shape is None:
        from kvcalib.calib.integrations.servers import shape_from_config

        shape = ModelShapeView.of(shape_from_config(model_config(view.model), view.dtype or "fp32").to_dict())
    if fmt is None:
        fmt = PromptFormatView(kind="chat_template", model=view.model, context_tokens=view.context_tokens)
    return replace(view, model_shape=shape, prompt_format=fmt,
                   kept_positions=view.kept_positions if include_positions else None)
