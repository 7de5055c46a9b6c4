"""Repository functions: every read and write of the profile store, one short transaction each where it matters.

Writes that may race (two API processes ingesting the same document, a redelivered job finishing twice) are
``INSERT … ON CONFLICT DO NOTHING`` followed by a read, on PostgreSQL and SQLite alike, so a unique constraint
decides the winner and nobody sees an IntegrityError.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from sqlalchemy import Connection, func, select, update
from sqlalchemy.orm import Session, defer

from kvcalib.service.orm import (
    Batch,
    BatchItem,
    CalibrationRun,
    CurvePoint,
    Document,
    Model,
    Prediction,
    Predictor,
    Profile,
    RunStatus,
    utcnow,
)
from kvcalib.service.views import BudgetView, ModelShapeView, PromptFormatView

TOLERANCE_EPS = 1e-6


class CalibrationOutcome(Protocol):
    """What ``save_result`` stores of a ``kvcalib.calib.calibration.calibrate.CalibrationResult``."""

    ratios: Sequence[float]
    fidelity: Sequence[float]
    kl: Sequence[float] | None
    r_star: float
    ratio: float  # the ratio to serve (r*, or the risk controller's); the budgets realise it
    controller: str | None  # the risk controller's version, None: ratio = r*
    context_tokens: int
    monotone: bool
    layer_budgets: Sequence[int]  # (L,)
    head_budgets: Sequence[Sequence[int]]  # (L, Hkv)
    features: dict[str, Any] | None
    seconds: float | None


def insert_ignore(s: Session, *, table: type, values: dict | list[dict], conflict: Sequence[str]) -> int:
    """``INSERT … ON CONFLICT (conflict) DO NOTHING`` for PostgreSQL and SQLite; returns the rows inserted."""
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - other databases: plain insert, the unique constraint still protects
        from sqlalchemy import insert
        return s.connection().execute(insert(table), values if isinstance(values, list) else [values]).rowcount
    stmt = (insert(table).values(values).on_conflict_do_nothing(index_elements=list(conflict))
            .returning(table.__table__.c.id))  # rowcount is unreliable with implicit RETURNING: count the rows
    return len(s.connection().execute(stmt).all())


# ---------------------------------------------------------------------------------------------------- models, docs
def get_or_create_model(s: Session, *, name: str, revision: str) -> Model:
    insert_ignore(s, table=Model, values={"name": name, "revision": revision, "created_at": utcnow()},
                  conflict=["name", "revision"])
    return s.scalars(select(Model).where(Model.name == name, Model.revision == revision)).one()


def get_or_create_document(s: Session, *, text: str, content_hash: str, source: str | None = None,
                           token_count: int | None = None) -> Document:
    insert_ignore(s, table=Document, values={
        "content_hash": content_hash, "n_bytes": len(text.encode("utf-8")), "text": text, "source": source,
        "token_count": token_count, "created_at": utcnow()}, conflict=["content_hash"])
    doc = s.scalars(select(Document).where(Document.content_hash == content_hash)).one()
    if doc.token_count is None and token_count is not None:
        doc.token_count = token_count
    return doc


def get_document(s: Session, *, document_id: int) -> Document | None:
    return s.get(Document, document_id)


def get_document_by_hash(s: Session, *, content_hash: str) -> Document | None:
    return s.scalars(select(Document).where(Document.content_hash == content_hash)).one_or_none()


UNFINISHED = (RunStatus.queued.value, RunStatus.running.value)


def unfinished_runs_of_document(s: Session, *, document_id: int) -> list[int]:
    return list(s.scalars(select(CalibrationRun.id).where(CalibrationRun.document_id == document_id,
                                                          CalibrationRun.status.in_(UNFINISHED))))


def delete_document(s: Session, *, document_id: int) -> dict[str, int]:
    """Delete a document with everything derived from it: its runs (jobs), their curve points and batch items,
    its profiles, the predictions of its hash. Explicit deletes child-first (the foreign keys also cascade). Returns
    the rows deleted per table."""
    from sqlalchemy import delete

    runs = select(CalibrationRun.id).where(CalibrationRun.document_id == document_id).scalar_subquery()
    content_hash = select(Document.content_hash).where(Document.id == document_id).scalar_subquery()
    counts = {}
    for name, stmt in (
        ("predictions", delete(Prediction).where(Prediction.content_hash == content_hash)),
        ("batch_items", delete(BatchItem).where(BatchItem.run_id.in_(runs))),
        ("curve_points", delete(CurvePoint).where(CurvePoint.run_id.in_(runs))),
        ("profiles", delete(Profile).where(Profile.document_id == document_id)),
        ("runs", delete(CalibrationRun).where(CalibrationRun.document_id == document_id)),
        ("documents", delete(Document).where(Document.id == document_id)),
    ):
        counts[name] = s.execute(stmt.execution_options(synchronize_session=False)).rowcount
    return counts


def forget_texts(s: Session, *, document_id: int | None = None) -> int:
    """Hash-only retention: erase the text of documents (all, or one) with no unfinished run; returns how many."""
    busy = select(CalibrationRun.id).where(CalibrationRun.document_id == Document.id,
                                           CalibrationRun.status.in_(UNFINISHED)).exists()
    stmt = update(Document).where(Document.text != "", ~busy)
    if document_id is not None:
        stmt = stmt.where(Document.id == document_id)
    return s.execute(stmt.values(text="").execution_options(synchronize_session=False)).rowcount


# ---------------------------------------------------------------------------------------------------- runs (jobs)
def get_or_create_run(s: Session, *, document: Document, model: Model, params: dict, params_hash: str, method: str,
                      allocator: str, tolerance: float, dtype: str | None = None,
                      device: str | None = None) -> tuple[CalibrationRun, bool]:
    """The run of (document, model, params hash); ``created`` tells whether this call inserted it. ``dtype``: the
    dtype the job loads the model in (a dtype other than fp32 is part of ``params_hash``,
    ``kvcalib.service.inputs.params_hash``); ``device``: where it runs (None: the worker's device; never part of
    ``params_hash``)."""
    key = (CalibrationRun.document_id == document.id, CalibrationRun.model_id == model.id,
           CalibrationRun.params_hash == params_hash)
    run = s.scalars(select(CalibrationRun).where(*key)).one_or_none()
    if run is not None:
        return run, False
    now = utcnow()
    inserted = insert_ignore(s, table=CalibrationRun, values={
        "document_id": document.id, "model_id": model.id, "params_hash": params_hash, "params": params,
        "method": method, "allocator": allocator, "tolerance": tolerance, "status": RunStatus.queued.value,
        "progress": 0.0, "attempts": 0, "created_at": now, "updated_at": now, "message": "queued", "dtype": dtype,
        "device": device,
    }, conflict=["document_id", "model_id", "params_hash"])
    run = s.scalars(select(CalibrationRun).where(*key)).one()
    return run, inserted == 1


def get_run(s: Session, *, run_id: int) -> CalibrationRun | None:
    return s.get(CalibrationRun, run_id)


def set_run(s: Session, *, run_id: int, **values: Any) -> None:
    values.setdefault("updated_at", utcnow())
    s.execute(update(CalibrationRun).where(CalibrationRun.id == run_id).values(**values))


def requeue_run(s: Session, *, run: CalibrationRun, reset_attempts: bool = True) -> None:
    run.status = RunStatus.queued.value
    run.progress = 0.0
    run.message = "queued (retry)"
    run.finished_at = None
    run.updated_at = utcnow()
    run.lease_owner = run.lease_expires_at = None  # only requeued when nobody holds it (failed, or lease expired)
    if reset_attempts:
        run.attempts = 0


def unfinished_runs(s: Session) -> list[int]:
    return list(s.scalars(select(CalibrationRun.id).where(
        CalibrationRun.status.in_([RunStatus.queued.value, RunStatus.running.value])).order_by(CalibrationRun.id)))


def run_counts(s: Session) -> dict[str, int]:
    rows = s.execute(select(CalibrationRun.status, func.count()).group_by(CalibrationRun.status)).all()
    out = {st.value: 0 for st in RunStatus}
    out.update({status: n for status, n in rows})
    return out


def curve_points(s: Session, *, run_id: int) -> list[CurvePoint]:
    return list(s.scalars(select(CurvePoint).where(CurvePoint.run_id == run_id).order_by(CurvePoint.ratio)))


# ---------------------------------------------------------------------------------------------------- profiles
def profile_for_run(s: Session, *, run_id: int) -> Profile | None:
    return s.scalars(select(Profile).where(Profile.run_id == run_id)).one_or_none()


def get_profile(s: Session, *, profile_id: int) -> Profile | None:
    return s.get(Profile, profile_id)


class ServerFields(Protocol):
    """What ``save_result`` stores for inference servers (``kvcalib.service.layout.ServerLayout``)."""

    ids_hash: str
    dtype: str
    model_shape: dict[str, Any]
    prompt_format: dict[str, Any]
    kept_positions: dict[str, Any] | None


def save_result(s: Session, *, run: CalibrationRun, result: CalibrationOutcome, token_budget: int,
                server: ServerFields | None = None) -> tuple[Profile, bool]:
    """Store the curve and the profile of a finished run exactly once. Returns (profile, written_now). The profile
    serves ``result.ratio`` (migration 0006) with its controller's version as ``predictor_version``. ``server``:
    the context ids' hash, dtype, model shape, prompt format and kept positions of the profile (migration 0004).

    Called inside one transaction with the run's status update, so a crash anywhere before the commit leaves
    nothing behind, and a second delivery of the same job finds the profile (or loses the unique-constraint race
    silently) instead of writing it twice."""
    existing = profile_for_run(s, run_id=run.id)
    if existing is not None:
        return existing, False
    points = [{"run_id": run.id, "ratio": float(r), "fidelity": float(f),
               "kl": None if k is None else float(k)}
              for r, f, k in zip(result.ratios, result.fidelity, _kl_list(result, len(result.ratios)))]
    if points:
        insert_ignore(s, table=CurvePoint, values=points, conflict=["run_id", "ratio"])
    insert_ignore(s, table=Profile, values={
        "run_id": run.id, "document_id": run.document_id, "model_id": run.model_id, "method": run.method,
        "allocator": run.allocator, "tolerance": run.tolerance, "r_star": float(result.r_star),
        "token_budget": int(token_budget), "context_tokens": int(result.context_tokens),
        "monotone": bool(result.monotone), "layer_budgets": [int(x) for x in result.layer_budgets],
        "head_budgets": [[int(x) for x in row] for row in result.head_budgets],
        "features": jsonable(result.features or {}), "predictor_version": result.controller,
        "ratio": float(result.ratio),
        "seconds": float(result.seconds) if result.seconds is not None else None, "created_at": utcnow(),
        "dtype": server.dtype if server is not None else run.dtype, **_server_values(server),
    }, conflict=["run_id"])
    profile = profile_for_run(s, run_id=run.id)
    return profile, True


def _server_values(server: ServerFields | None) -> dict[str, Any]:
    """The server columns of a profile; absent ones are left out (SQL NULL, not a JSON null)."""
    if server is None:
        return {}
    values = {"ids_hash": server.ids_hash, "model_shape": jsonable(server.model_shape),
              "prompt_format": jsonable(server.prompt_format)}
    if server.kept_positions is not None:
        values["kept_positions"] = jsonable(server.kept_positions)
    return values


def _kl_list(result: CalibrationOutcome, n: int) -> list[float | None]:
    kl = result.kl
    if kl is None:
        return [None] * n
    kl = list(kl)
    return kl + [None] * (n - len(kl))


def jsonable(obj: Any) -> Any:
    """Features may hold numpy/torch scalars; JSON columns need plain Python (NaN/inf → None)."""
    import math

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    try:
        return jsonable(float(obj))
    except (TypeError, ValueError):
        return str(obj)


def find_profile(s: Session, *, content_hash: str, model_name: str, tolerance: float, method: str | None = None,
                 allocator: str | None = None) -> Profile | None:
    """The newest profile of a document under a model at tolerance τ (optionally a given method/allocator)."""
    q = (select(Profile).join(Document, Profile.document_id == Document.id).join(Model, Profile.model_id == Model.id)
         .where(Document.content_hash == content_hash, Model.name == model_name,
                Profile.tolerance.between(tolerance - TOLERANCE_EPS, tolerance + TOLERANCE_EPS)))
    if method:
        q = q.where(Profile.method == method)
    if allocator:
        q = q.where(Profile.allocator == allocator)
    return s.scalars(q.order_by(Profile.created_at.desc(), Profile.id.desc()).limit(1)).first()


BUDGET_COLUMNS = (Profile.id, Document.content_hash, Model.name, Model.revision, Profile.method, Profile.allocator,
                  Profile.tolerance, func.coalesce(Profile.ratio, Profile.r_star), Profile.token_budget,
                  Profile.context_tokens,
                  Profile.layer_budgets, Profile.head_budgets, Profile.predictor_version, Profile.ids_hash,
                  Profile.dtype, Profile.model_shape, Profile.prompt_format)
OLD_ROWS_DTYPE = "fp32"  # profiles from before migration 0004 record no dtype: the service default then


def _budget_query(key: str, positions: bool):
    """The budget look-up by document hash (``key="content_hash"``) or by context-ids hash (``"ids_hash"``), with
    the kept positions or without (they can be large: read only when asked)."""
    from sqlalchemy import String, bindparam, or_

    method, allocator = bindparam("method", type_=String), bindparam("allocator", type_=String)
    dtype = bindparam("dtype", type_=String)
    match = (Document.content_hash == bindparam("key") if key == "content_hash"
             else Profile.ids_hash == bindparam("key"))
    columns = BUDGET_COLUMNS + ((Profile.kept_positions,) if positions else ())
    return (select(*columns).join(Document, Profile.document_id == Document.id)
            .join(Model, Profile.model_id == Model.id)
            .where(match, Model.name == bindparam("model"),
                   Profile.tolerance.between(bindparam("lo"), bindparam("hi")),
                   or_(method.is_(None), Profile.method == method),
                   or_(allocator.is_(None), Profile.allocator == allocator),
                   or_(dtype.is_(None), func.coalesce(Profile.dtype, OLD_ROWS_DTYPE) == dtype))
            .order_by(Profile.created_at.desc(), Profile.id.desc()).limit(1))


# built once: the hot path only binds parameters
BUDGET_QUERIES = {(key, positions): _budget_query(key, positions)
                  for key in ("content_hash", "ids_hash") for positions in (False, True)}


def find_budget(conn: Session | Connection, *, model_name: str, tolerance: float, content_hash: str | None = None,
                ids_hash: str | None = None, method: str | None = None, allocator: str | None = None,
                dtype: str | None = None, include_positions: bool = False) -> BudgetView | None:
    """The hot path of ``GET /budget``: the newest profile of a document (``content_hash``) or of the exact context
    token ids (``ids_hash``) under a model at τ, reading only the budget columns (one indexed query); the kept
    positions only with ``include_positions``. ``conn`` is a Session or a Core Connection."""
    if (content_hash is None) == (ids_hash is None):
        raise ValueError("give exactly one of content_hash or ids_hash")
    key = "content_hash" if content_hash is not None else "ids_hash"
    row = conn.execute(BUDGET_QUERIES[key, include_positions], {
        "key": content_hash if content_hash is not None else ids_hash, "model": model_name,
        "lo": tolerance - TOLERANCE_EPS, "hi": tolerance + TOLERANCE_EPS, "method": method or None,
        "allocator": allocator or None, "dtype": dtype or None}).first()
    if row is None:
        return None
    (pid, h, model, revision, method_, alloc, tol, r, tb, n, lb, hb, pv, ih, dt_, shape, fmt) = row[:17]
    return BudgetView(source="profile", document_hash=h, model=model, model_revision=revision, method=method_,
                      allocator=alloc, tolerance=tol, ratio=r, token_budget=tb, context_tokens=n, layer_budgets=lb,
                      head_budgets=hb, profile_id=pid, predictor_version=pv, ids_hash=ih,
                      dtype=dt_ or OLD_ROWS_DTYPE, model_shape=ModelShapeView.of(shape),
                      prompt_format=PromptFormatView.of(fmt),
                      kept_positions=row[17] if include_positions else None)


def profile_tolerances(s: Session, *, content_hash: str, model_name: str) -> list[float]:
    q = (select(Profile.tolerance).join(Document, Profile.document_id == Document.id)
         .join(Model, Profile.model_id == Model.id)
         .where(Document.content_hash == content_hash, Model.name == model_name).distinct())
    return sorted({round(t, 6) for t in s.scalars(q)})


def stored_r_stars(s: Session, *, model_name: str, method: str, allocator: str, tolerance: float,
                   limit: int = 1000) -> list[float]:
    q = (select(Profile.r_star).join(Model, Profile.model_id == Model.id)
         .where(Model.name == model_name, Profile.method == method, Profile.allocator == allocator,
                Profile.tolerance.between(tolerance - TOLERANCE_EPS, tolerance + TOLERANCE_EPS))
         .order_by(Profile.id.desc()).limit(limit))
    return [float(x) for x in s.scalars(q)]


def profiles_of_document(s: Session, *, content_hash: str, model_name: str) -> list[Profile]:
    q = (select(Profile).join(Document, Profile.document_id == Document.id).join(Model, Profile.model_id == Model.id)
         .where(Document.content_hash == content_hash, Model.name == model_name))
    return list(s.scalars(q))


def count_profiles(s: Session) -> int:
    return s.scalar(select(func.count()).select_from(Profile)) or 0


# ---------------------------------------------------------------------------------------------------- batches
def create_batch(s: Session, *, run_ids: Iterable[int], params: dict) -> Batch:
    run_ids = list(run_ids)
    batch = Batch(params=params, total=len(run_ids), created_at=utcnow())
    s.add(batch)
    s.flush()
    if run_ids:
        s.execute(BatchItem.__table__.insert(),
                  [{"batch_id": batch.id, "position": i, "run_id": r} for i, r in enumerate(run_ids)])
    return batch


def get_batch(s: Session, *, batch_id: int) -> Batch | None:
    return s.get(Batch, batch_id)


def batch_rows(s: Session, *, batch_id: int) -> list[tuple[int, int, str, float, str | None, int | None, str]]:
    """(position, run id, status, progress, error, profile id, document hash) of every item, in order."""
    q = (select(BatchItem.position, CalibrationRun.id, CalibrationRun.status, CalibrationRun.progress,
                CalibrationRun.error, Profile.id, Document.content_hash)
         .join(CalibrationRun, BatchItem.run_id == CalibrationRun.id)
         .join(Document, CalibrationRun.document_id == Document.id)
         .outerjoin(Profile, Profile.run_id == CalibrationRun.id)
         .where(BatchItem.batch_id == batch_id).order_by(BatchItem.position))
    return [tuple(r) for r in s.execute(q).all()]


# ---------------------------------------------------------------------------------------------------- predictors
def add_predictor(s: Session, *, version: str, metrics: dict, artefact_path: str | None, kind: str | None = None,
                  artefact: bytes | None = None, source: str | None = None, model: str | None = None,
                  training_config: dict | None = None) -> tuple[Predictor, bool]:
    """Record a predictor once per version; returns (its row, whether this call inserted it). A version recorded
    before keeps its row (its source, model and artefact) unchanged."""
    inserted = insert_ignore(s, table=Predictor, values={
        "version": version, "metrics": jsonable(metrics), "artefact_path": artefact_path, "kind": kind,
        "artefact": artefact, "source": source, "model": model,
        "training_config": jsonable(training_config) if training_config is not None else None,
        "created_at": utcnow()}, conflict=["version"])
    return s.scalars(select(Predictor).where(Predictor.version == version)).one(), inserted == 1


def register_predictor(s: Session, *, version: str, metrics: dict, artefact_path: str | None,
                       kind: str | None = None, artefact: bytes | None = None, source: str | None = None,
                       model: str | None = None, training_config: dict | None = None) -> Predictor:
    return add_predictor(s, version=version, metrics=metrics, artefact_path=artefact_path, kind=kind,
                         artefact=artefact, source=source, model=model, training_config=training_config)[0]


def latest_predictor(s: Session) -> Predictor | None:
    return s.scalars(select(Predictor).order_by(Predictor.created_at.desc(), Predictor.id.desc()).limit(1)).first()


SHIPPED_SOURCE = "shipped"


def predictor_candidates(s: Session, *, model: str, limit: int = 50) -> list[Predictor]:
    """The stored predictors that may answer a request for ``model``, newest first: registered and configured ones
    (rows from before sources were recorded included) bound to that model or to none. Shipped ones are package data,
    chosen after these."""
    from sqlalchemy import or_

    q = (select(Predictor).options(defer(Predictor.artefact))  # read by the chosen one only
         .where(or_(Predictor.source.is_(None), Predictor.source != SHIPPED_SOURCE),
                or_(Predictor.model.is_(None), Predictor.model == model))
         .order_by(Predictor.created_at.desc(), Predictor.id.desc()).limit(limit))
    return list(s.scalars(q))


def list_predictors(s: Session, *, limit: int = 1000) -> list[Predictor]:
    """Every recorded predictor, newest first."""
    q = select(Predictor).options(defer(Predictor.artefact)).order_by(Predictor.created_at.desc(),
                                                                      Predictor.id.desc())
    return list(s.scalars(q.limit(limit)))


# ---------------------------------------------------------------------------------------------------- predictions
PREDICTION_KEY = ("content_hash", "model", "model_revision", "method", "allocator", "tolerance", "params_hash",
                  "predictor_version")


def save_prediction(s: Session, *, content_hash: str, model: str, model_revision: str, method: str, allocator: str,
                    tolerance: float, params_hash: str, ratio: float, token_budget: int, context_tokens: int,
                    predictor_version: str, predictor_kind: str | None, features: dict[str, Any] | None,
                    ids_hash: str | None = None, dtype: str | None = None) -> bool:
    """Store a predicted budget once per (document hash, model, revision, method, allocator, τ, parameters hash,
    predictor version): the same prediction asked again writes nothing. Returns whether this call stored it.
    ``ids_hash``: the hash of the context token ids it was predicted from; ``dtype``: the model's dtype."""
    return insert_ignore(s, table=Prediction, values={
        "content_hash": content_hash, "model": model, "model_revision": model_revision, "method": method,
        "allocator": allocator, "tolerance": float(tolerance), "params_hash": params_hash, "ratio": float(ratio),
        "token_budget": int(token_budget), "context_tokens": int(context_tokens),
        "predictor_version": predictor_version, "predictor_kind": predictor_kind,
        "features": jsonable(features or {}), "created_at": utcnow(), "ids_hash": ids_hash,
        "dtype": dtype}, conflict=PREDICTION_KEY) == 1


def list_predictions(s: Session, *, content_hash: str | None = None, model: str | None = None,
                     method: str | None = None, allocator: str | None = None, limit: int = 100,
                     ids_hash: str | None = None) -> list[Prediction]:
    """Stored predictions, newest first, optionally of one document hash, context-ids hash, model, method or
    allocator."""
    q = select(Prediction)
    for column, value in ((Prediction.content_hash, content_hash), (Prediction.model, model),
                          (Prediction.method, method), (Prediction.allocator, allocator),
                          (Prediction.ids_hash, ids_hash)):
        if value is not None:
            q = q.where(column == value)
    return list(s.scalars(q.order_by(Prediction.created_at.desc(), Prediction.id.desc()).limit(limit)))


def stale_before(*, seconds: float) -> dt.datetime:
    return utcnow() - dt.timedelta(seconds=seconds)
