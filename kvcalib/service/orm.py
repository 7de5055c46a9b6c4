"""The profile store's tables (SQLAlchemy 2.0 typed ORM). Alembic migrations (``migrations/``) are the only schema
path: ``Base.metadata.create_all`` is never called by the service.

Idempotency lives in unique constraints: a document is stored once per content hash, a calibration run once per
(document, model, parameters hash), a curve point once per (run, ratio), a profile once per run, a batch item once
per (batch, position), a prediction once per (document hash, model, parameters, predictor). Optuna's tables (a
later issue) share the database but are not part of this metadata.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Primary keys: BIGINT on PostgreSQL, INTEGER (rowid alias, autoincrement) on SQLite.
Id = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class StoreTable(Base):
    """A table of the store: every one has the same surrogate primary key ``id``, its first column (``sort_order``:
    inherited columns would otherwise come last), as in the migrations."""

    __abstract__ = True

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True, sort_order=-1)


class RunStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.succeeded, RunStatus.failed)


class Model(StoreTable):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "revision"),)

    name: Mapped[str] = mapped_column(String(200))
    revision: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                    server_default=func.now())


class Document(StoreTable):
    __tablename__ = "documents"

    content_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the UTF-8 text
    n_bytes: Mapped[int] = mapped_column(Integer)
    token_count: Mapped[int | None] = mapped_column(Integer, nullable=True)  # with the first model that saw it
    source: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                    server_default=func.now())


class CalibrationRun(StoreTable):
    """One calibration job: the curve and r* of a document under a model and a parameter set. Also the job row."""

    __tablename__ = "calibration_runs"
    __table_args__ = (UniqueConstraint("document_id", "model_id", "params_hash"),)

    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    params_hash: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    method: Mapped[str] = mapped_column(String(100))
    allocator: Mapped[str] = mapped_column(String(100))
    tolerance: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default=RunStatus.queued.value, index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(String(500), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    task_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # fp32 | bf16 | fp16: the dtype the job loads the model in (None: rows from before 0004, the loader's default)
    dtype: Mapped[str | None] = mapped_column(String(8), nullable=True)
    # cpu | cuda | cuda:N: the device the job loads the model on (None: the executing worker's KVCALIB_WORKER_DEVICE;
    # migration 0005). Not part of ``params_hash``: a profile computed on cuda serves cpu requests too.
    device: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # The lease (``kvcalib.service.leases``): who executes the run and until when, renewed by its heartbeat; a run
    # whose lease expired, or queued with no message since ``dispatched_at``, is sent again by the sweeper.
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                    server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow,
                                                    server_default=func.now())
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    document: Mapped[Document] = relationship()
    model: Mapped[Model] = relationship(lazy="joined")


class CurvePoint(StoreTable):
    __tablename__ = "curve_points"
    __table_args__ = (UniqueConstraint("run_id", "ratio"),)

    run_id: Mapped[int] = mapped_column(ForeignKey("calibration_runs.id", ondelete="CASCADE"), index=True)
    ratio: Mapped[float] = mapped_column(Float)
    fidelity: Mapped[float] = mapped_column(Float)
    kl: Mapped[float | None] = mapped_column(Float, nullable=True)


class Profile(StoreTable):
    """The product of a calibration run: r* at the tolerance, the ratio it serves (risk-controlled where a controller
    fits) and the budgets that realise that ratio."""

    __tablename__ = "profiles"
    __table_args__ = (Index("ix_profiles_lookup", "document_id", "model_id", "tolerance"),)

    run_id: Mapped[int] = mapped_column(ForeignKey("calibration_runs.id", ondelete="CASCADE"), unique=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(String(100))
    allocator: Mapped[str] = mapped_column(String(100))
    tolerance: Mapped[float] = mapped_column(Float)
    r_star: Mapped[float] = mapped_column(Float)
    token_budget: Mapped[int] = mapped_column(Integer)  # average kept positions per (layer, head)
    context_tokens: Mapped[int] = mapped_column(Integer)
    monotone: Mapped[bool] = mapped_column(Boolean, default=True)
    layer_budgets: Mapped[list[Any]] = mapped_column(JSON)  # (L,) kept positions per layer
    head_budgets: Mapped[list[Any]] = mapped_column(JSON)  # (L, Hkv) kept positions per head
    features: Mapped[dict[str, Any]] = mapped_column(JSON)
    predictor_version: Mapped[str | None] = mapped_column(String(100), nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                    server_default=func.now())
    # Budgets for servers (migration 0004; None on older rows): sha256 of the model name + the exact context ids
    # (``calib.integrations.servers.token_ids_hash``), the dtype, the model shape, the prompt layout of the ids and
    # the kept positions at r* (``encode_kept_positions``).
    ids_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    dtype: Mapped[str | None] = mapped_column(String(8), nullable=True)
    model_shape: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    prompt_format: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    kept_positions: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The ratio the profile serves (migration 0006; None on older rows: r*): the risk controller's ratio, whose
    # version is ``predictor_version``, or r* where none fits. The budgets and kept positions realise it.
    ratio: Mapped[float | None] = mapped_column(Float, nullable=True)

    @property
    def served_ratio(self) -> float:
        return float(self.ratio if self.ratio is not None else self.r_star)

    run: Mapped[CalibrationRun] = relationship()
    document: Mapped[Document] = relationship()
    model: Mapped[Model] = relationship()


class Predictor(StoreTable):
    """A predictor this deployment knows: served (``configured``: ``KVCALIB_PREDICTOR_PATH``; ``shipped``: package
    data, recorded when first served) or registered through ``POST /predictors`` (``registered``: its JSON file in
    ``artefact``). ``model`` binds it to one model (None: any); ``training_config`` is its ``training_config()``
    (method, allocator, τ), read to choose a predictor without loading every candidate."""

    __tablename__ = "predictors"

    version: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str | None] = mapped_column(String(100), nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artefact_path: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    artefact: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # the predictor's JSON file, optional
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                    server_default=func.now())
    source: Mapped[str | None] = mapped_column(String(16), nullable=True)  # configured | registered | shipped
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    training_config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Prediction(StoreTable):
    """A predicted budget, stored once per (document hash, model and revision, parameters, predictor version). Keyed
    by the document's hash, not its row: predictions of documents that are not stored (``POST /budget``) are kept
    too, and never their text. A prediction from token ids (``POST /budget`` with ``token_ids``) has no document:
    its ``content_hash`` is its ``ids_hash``. A dtype other than fp32 is part of ``params_hash``."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("content_hash", "model", "model_revision", "method", "allocator", "tolerance",
                                       "params_hash", "predictor_version", name="uq_predictions_key"),)

    content_hash: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(200))
    model_revision: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(100))
    allocator: Mapped[str] = mapped_column(String(100))
    tolerance: Mapped[float] = mapped_column(Float)
    params_hash: Mapped[str] = mapped_column(String(64))  # CalibrationConfig.params_hash(): method parameters too
    ratio: Mapped[float] = mapped_column(Float)
    token_budget: Mapped[int] = mapped_column(Integer)
    context_tokens: Mapped[int] = mapped_column(Integer)
    predictor_version: Mapped[str] = mapped_column(String(100))
    predictor_kind: Mapped[str | None] = mapped_column(String(100), nullable=True)
    features: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                    server_default=func.now())
    ids_hash: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # migration 0004
    dtype: Mapped[str | None] = mapped_column(String(8), nullable=True)


class Batch(StoreTable):
    __tablename__ = "batches"

    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    total: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow,
                                                    server_default=func.now())


class BatchItem(StoreTable):
    __tablename__ = "batch_items"
    __table_args__ = (UniqueConstraint("batch_id", "position"),)

    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[int] = mapped_column(ForeignKey("calibration_runs.id", ondelete="CASCADE"), index=True)

    run: Mapped[CalibrationRun] = relationship(lazy="joined")
