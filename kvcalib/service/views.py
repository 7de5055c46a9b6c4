"""Typed results of the service layer: what the routers, the worker and the CLI get back (never ORM rows, never
dicts). ``kvcalib.api.convert`` maps them onto the HTTP response models; ``dataclasses.asdict`` gives their JSON.

Field order is the order of the JSON objects built from them (``asdict``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kvcalib.service.orm import Batch, CalibrationRun, CurvePoint, Prediction, Profile, RunStatus

BudgetSource = Literal["profile", "predicted"]
PromptKind = Literal["chat_template", "token_ids"]
CompressSource = Literal["ratio", "profile", "predicted"]
PredictorSource = Literal["shipped", "configured", "registered"]


@dataclass(frozen=True)
class ProfileSummary:
    """The result of a succeeded job: its profile in brief."""

    profile_id: int
    r_star: float
    ratio: float  # the ratio served: risk-controlled, or r* where no controller fits
    token_budget: int
    context_tokens: int
    monotone: bool
    seconds: float | None

    @classmethod
    def of(cls, p: Profile) -> ProfileSummary:
        return cls(profile_id=p.id, r_star=p.r_star, ratio=p.served_ratio, token_budget=p.token_budget,
                   context_tokens=p.context_tokens,
                   monotone=p.monotone, seconds=p.seconds)


@dataclass(frozen=True)
class CalibrationKey:
    """Fields of jobs and profiles alike: what was calibrated (document, model, parameters). Listed as the first
    base (``JobView(CalibrationKey, _JobHead)``): dataclass fields are collected from the last base to the class
    itself, so they follow the head's fields, as in the JSON."""

    document_id: int
    document_hash: str
    model: str
    model_revision: str
    method: str
    allocator: str
    tolerance: float


@dataclass(frozen=True)
class _JobHead:
    id: int
    status: str  # RunStatus value
    progress: float
    message: str | None
    error: str | None
    attempts: int


@dataclass(frozen=True)
class JobView(CalibrationKey, _JobHead):
    """A calibration run seen as a job: status, progress and, once succeeded, its profile."""

    params_hash: str
    params: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    result: ProfileSummary | None
    dtype: str | None = None  # the dtype the job loads the model in (None: from before migration 0004)
    device: str | None = None  # the device the job runs on (None: the worker's KVCALIB_WORKER_DEVICE)

    @property
    def succeeded(self) -> bool:
        return self.status == RunStatus.succeeded.value

    @classmethod
    def of(cls, run: CalibrationRun, profile: Profile | None) -> JobView:
        return cls(id=run.id, status=run.status, progress=1.0 if profile else float(run.progress),
                   message=run.message, error=run.error, attempts=run.attempts, document_id=run.document_id,
                   document_hash=run.document.content_hash, model=run.model.name, model_revision=run.model.revision,
                   method=run.method, allocator=run.allocator, tolerance=run.tolerance, params_hash=run.params_hash,
                   params=run.params, created_at=run.created_at, updated_at=run.updated_at,
                   started_at=run.started_at, finished_at=run.finished_at,
                   result=ProfileSummary.of(profile) if profile else None, dtype=run.dtype,
                   device=run.device)


@dataclass(frozen=True)
class BatchItemView:
    position: int
    job_id: int
    status: str
    progress: float
    error: str | None
    profile_id: int | None
    document_hash: str


@dataclass(frozen=True)
class BatchView:
    """Aggregate progress of a batch (and its items, unless asked without)."""

    id: int
    total: int
    counts: dict[str, int]  # jobs per RunStatus value
    progress: float
    done: bool
    status: str  # queued | running | succeeded | finished_with_errors
    params: dict[str, Any]
    created_at: dt.datetime
    items: list[BatchItemView] | None

    @classmethod
    def of(cls, b: Batch, rows: Sequence[tuple[int, int, str, float, str | None, int | None, str]],
           items: bool = True) -> BatchView:
        """``rows``: (position, run id, status, progress, error, profile id, document hash) of ``batch_rows``."""
        finished = (RunStatus.succeeded.value, RunStatus.failed.value)
        counts = {st.value: 0 for st in RunStatus}
        for _, _, status, *_ in rows:
            counts[status] = counts.get(status, 0) + 1
        total = len(rows)
        progress = sum(1.0 if st in finished else float(pr) for _, _, st, pr, *_ in rows) / total if total else 1.0
        done = counts[RunStatus.succeeded.value] + counts[RunStatus.failed.value] == total
        if done:
            status = "succeeded" if counts["succeeded"] == total else "finished_with_errors"
        else:
            status = "running" if counts["running"] or counts["succeeded"] or counts["failed"] else "queued"
        return cls(id=b.id, total=total, counts=counts, progress=progress, done=done, status=status,
                   params=b.params, created_at=b.created_at,
                   items=[BatchItemView(position=pos, job_id=rid, status=st, progress=1.0 if pid else float(pr),
                                        error=err, profile_id=pid, document_hash=h)
                          for pos, rid, st, pr, err, pid, h in rows] if items else None)


@dataclass(frozen=True)
class CurvePointView:
    ratio: float
    fidelity: float
    kl: float | None


@dataclass(frozen=True)
class _ProfileHead:
    id: int
    job_id: int


@dataclass(frozen=True)
class ProfileView(CalibrationKey, _ProfileHead):
    """A stored profile: r* at τ, the ratio it serves (risk-controlled where a controller fits, whose version is
    ``predictor_version``; else r*), the budgets that realise that ratio, the document's features and the curve."""

    r_star: float
    ratio: float
    token_budget: int
    context_tokens: int
    monotone: bool
    layer_budgets: list[int]  # (L,)
    head_budgets: list[list[int]]  # (L, Hkv)
    features: dict[str, Any]
    predictor_version: str | None
    seconds: float | None
    created_at: dt.datetime
    params: dict[str, Any]
    curve: list[CurvePointView]
    dtype: str | None = None  # migration 0004 (None on older profiles)
    ids_hash: str | None = None  # sha256 of the model name + the exact context token ids (token_ids_hash)

    @classmethod
    def of(cls, p: Profile, points: Sequence[CurvePoint]) -> ProfileView:
        return cls(id=p.id, job_id=p.run_id, document_id=p.document_id, document_hash=p.document.content_hash,
                   model=p.model.name, model_revision=p.model.revision, method=p.method, allocator=p.allocator,
                   tolerance=p.tolerance, r_star=p.r_star, ratio=p.served_ratio,
                   token_budget=p.token_budget,
                   context_tokens=p.context_tokens, monotone=p.monotone, layer_budgets=p.layer_budgets,
                   head_budgets=p.head_budgets, features=p.features, predictor_version=p.predictor_version,
                   seconds=p.seconds, created_at=p.created_at, params=p.run.params,
                   curve=[CurvePointView(ratio=c.ratio, fidelity=c.fidelity, kl=c.kl) for c in points],
                   dtype=p.dtype, ids_hash=p.ids_hash)


@dataclass(frozen=True)
class ModelShapeView:
    """What a server needs to lay a budget out (``calib.integrations.servers.ModelShape``)."""

    layers: int
    kv_heads: int
    query_heads: int
    head_dim: int
    dtype: str  # fp32 | bf16 | fp16: the weights' and the cached keys/values' dtype the budget was measured in
    model_type: str

    @classmethod
    def of(cls, d: dict[str, Any] | None) -> ModelShapeView | None:
        if not d:
            return None
        return cls(layers=int(d["layers"]), kv_heads=int(d["kv_heads"]), query_heads=int(d["query_heads"]),
                   head_dim=int(d["head_dim"]), dtype=str(d["dtype"]), model_type=str(d.get("model_type") or ""))


@dataclass(frozen=True)
class PromptFormatView:
    """The prompt layout of the context token ids a budget was measured on: ``chat_template`` (kvcalib's: the
    model's chat template up to the user turn, then the document — ``Engine.prompt(text, q).context_ids``; the
    document starts at ``doc_start``) or ``token_ids`` (exactly the ids a caller sent)."""

    kind: PromptKind
    model: str
    context_tokens: int
    doc_start: int | None = None  # None: unknown (profiles from before migration 0004)
    ids_hash: str | None = None

    @classmethod
    def of(cls, d: dict[str, Any] | None) -> PromptFormatView | None:
        if not d:
            return None
        return cls(kind=d["kind"], model=str(d["model"]), context_tokens=int(d["context_tokens"]),
                   doc_start=None if d.get("doc_start") is None else int(d["doc_start"]), ids_hash=d.get("ids_hash"))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "context_tokens": self.context_tokens,
                "doc_start": self.doc_start, "ids_hash": self.ids_hash}


@dataclass(frozen=True)
class BudgetView:
    """The budget of a document for inference servers: a stored profile's, or a prediction's."""

    source: BudgetSource
    document_hash: str | None  # None: predicted from token ids
    model: str
    model_revision: str | None
    method: str
    allocator: str
    tolerance: float
    ratio: float  # compression ratio to apply (a profile's served ratio, or the predicted one)
    token_budget: int  # average kept positions per (layer, kv head)
    context_tokens: int
    layer_budgets: list[int]  # (L,) kept positions per layer
    head_budgets: list[list[int]]  # (L, Hkv) kept positions per head
    profile_id: int | None
    predictor_version: str | None
    document_id: int | None = None  # predictions only (the stored-budget hot path does not read it)
    features: dict[str, Any] | None = None  # predictions only
    ids_hash: str | None = None  # sha256 of the model name + the context token ids (token_ids_hash)
    dtype: str | None = None
    model_shape: ModelShapeView | None = None
    prompt_format: PromptFormatView | None = None
    kept_positions: dict[str, Any] | None = None  # encode_kept_positions, only when asked for


@dataclass(frozen=True)
class CompressionInfo:
    """What a compressed cache was compressed from and at (written into the safetensors metadata)."""

    model: str
    model_revision: str
    method: str
    allocator: str
    tolerance: float
    ratio: float  # the ratio asked for: explicit, the profile's r*, or predicted
    budget_source: CompressSource
    document_hash: str
    document_id: int
    predictor_version: str | None = None  # budget_source "predicted" only (not in the safetensors metadata)

    def metadata(self) -> dict[str, Any]:
        """The safetensors metadata (the ratio as ``%.6f``, as in the ``X-Kvcalib-Ratio`` header)."""
        return {"model": self.model, "model_revision": self.model_revision, "method": self.method,
                "allocator": self.allocator, "tolerance": self.tolerance, "ratio": f"{self.ratio:.6f}",
                "budget_source": self.budget_source, "document_hash": self.document_hash,
                "document_id": self.document_id}


@dataclass(frozen=True)
class CompressedCache:
    """A compressed KV cache: safetensors bytes (``kvcalib.calib.cache.export``) and how its budget was chosen."""

    data: bytes
    info: CompressionInfo
    achieved_ratio: float  # 1 − kept / full over every (layer, head)
    context_tokens: int


@dataclass(frozen=True)
class Readiness:
    ready: bool
    checks: dict[str, str]  # dependency → "ok" | "in-process" | "none" | "unavailable: …"
    execution: str  # the dispatcher kind, or "none"


@dataclass(frozen=True)
class DocumentDeletion:
    """What ``DELETE /documents/{id}`` removed: the document (its text) and every row derived from it."""

    document_id: int
    document_hash: str
    runs: int  # calibration runs (jobs)
    profiles: int
    curve_points: int
    batch_items: int
    predictions: int = 0  # stored predictions of its hash


@dataclass(frozen=True)
class PredictorInfo:
    """A predictor the service knows (``GET /predictors``): shipped with the package, configured
    (``KVCALIB_PREDICTOR_PATH``) or registered (``POST /predictors``, or recorded when served)."""

    name: str | None  # the manifest entry of a shipped or configured folder
    version: str
    kind: str | None
    model: str | None  # the model it answers for (None: any)
    source: PredictorSource
    training_config: dict[str, Any]
    metrics: dict[str, Any]
    default: bool  # what a request for its model at the service's default method, allocator and τ is served by
    created_at: dt.datetime | None = None  # when it was recorded in the store


@dataclass(frozen=True)
class PredictorListing:
    predictors: list[PredictorInfo]
    defaults: dict[str, str]  # model → the predictor version served at the default method, allocator and τ


@dataclass(frozen=True)
class PredictionView:
    """A stored prediction (``GET /predictions``)."""

    id: int
    document_hash: str
    model: str
    model_revision: str
    method: str
    allocator: str
    tolerance: float
    params_hash: str
    ratio: float
    token_budget: int
    context_tokens: int
    predictor_version: str
    predictor_kind: str | None
    features: dict[str, Any]
    created_at: dt.datetime
    ids_hash: str | None = None  # the context token ids' hash (token_ids_hash); None before migration 0004
    dtype: str | None = None

    @classmethod
    def of(cls, p: Prediction) -> PredictionView:
        return cls(id=p.id, document_hash=p.content_hash, model=p.model, model_revision=p.model_revision,
                   method=p.method, allocator=p.allocator, tolerance=p.tolerance, params_hash=p.params_hash,
                   ratio=p.ratio, token_budget=p.token_budget, context_tokens=p.context_tokens,
                   predictor_version=p.predictor_version, predictor_kind=p.predictor_kind, features=p.features,
                   created_at=p.created_at, ids_hash=p.ids_hash, dtype=p.dtype)
