"""Request and response models of the HTTP API (pydantic v2). The OpenAPI schema is generated from these."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from kvcalib.calib.budget import available_allocators
from kvcalib.calib.lm.registry import available_models
from kvcalib.calib.scorers import available_methods
from kvcalib.settings import DEVICE_PATTERN

# The registries as enums: the OpenAPI schema lists the valid choices, and an unknown name is a 422 naming them.
ModelName = Literal[tuple(available_models())]  # type: ignore[valid-type]
MethodName = Literal[tuple(available_methods())]  # type: ignore[valid-type]
AllocatorName = Literal[tuple(available_allocators())]  # type: ignore[valid-type]

MAX_ID = 2**63 - 1
DocId = Annotated[int, Field(ge=1, le=MAX_ID, description="Id of a stored document.")]
Hash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 (hex) of the document's UTF-8 text.")]
Ratio = Annotated[float, Field(ge=0.0, lt=1.0)]
Dtype = Literal["fp32", "bf16", "fp16"]
Device = Annotated[str, Field(pattern=DEVICE_PATTERN, examples=["cpu", "cuda", "cuda:1"])]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationOptions(Strict):
    """Optional overrides of ``CalibrationConfig`` (defaults are the library's)."""

    ratios: list[Ratio] | None = Field(None, min_length=1, max_length=64,
                                       description="Compression ratios of the fidelity curve.")
    n_probes: int | None = Field(None, ge=1, le=256, description="Number of probe continuations.")
    probe_tokens: int | None = Field(None, ge=1, le=512, description="Tokens per probe.")
    cue_tokens: int | None = Field(None, ge=1, le=512, description="Cue tokens of each probe.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    method_params: dict[str, Any] | None = Field(None, description="Hyperparameters of the scoring method.")
    fidelity: Literal["reconstruction", "kl", "salient", "keytoken", "self_answer", "self_prob"] | None = Field(
        None, description="Label-free fidelity of the curve (docs/calibration.md §11; default: the library's).")


class CalibrationParamsIn(Strict):
    model: ModelName | None = Field(None, description="Registry model (default: KVCALIB_DEFAULT_MODEL).")
    dtype: Dtype | None = Field(
        None, description="Dtype of the model's weights and KV cache (default: KVCALIB_WORKER_DTYPE, fp32). The "
                          "service keeps one engine per (model, dtype); profiles and predictions record it, and a "
                          "dtype other than fp32 is another parameter set (another job).")
    device: Device | None = Field(
        None, description="Where the model runs: cpu, cuda or cuda:N (default: KVCALIB_WORKER_DEVICE of the process "
                          "that runs it). One of KVCALIB_ALLOWED_DEVICES (default: the worker device alone), and a "
                          "device this server has: anything else is a 422 saying why. predict / compress / POST "
                          "/budget load the model on it here; full calibrations and batches run their jobs on it. "
                          "The device is not part of the parameters hash: a profile computed on cuda serves cpu "
                          "requests too (and a job already queued or done for these parameters is answered as is).")
    method: MethodName | None = Field(None, description="Scoring method (default: KVCALIB_DEFAULT_METHOD).")
    allocator: AllocatorName | None = Field(None, description="Budget allocator (default: KVCALIB_DEFAULT_ALLOCATOR).")
    tolerance: float | None = Field(None, gt=0.0, le=1.0, description="Fidelity tolerance τ: r* is the largest ratio "
                                                                      "whose fidelity stays ≥ τ.")
    options: CalibrationOptions | None = None


ONE_DOCUMENT = {"oneOf": [{"required": ["text"]}, {"required": ["document_id"]}, {"required": ["document_hash"]}]}


class DocumentIn(Strict):
    """Exactly one of ``text``, ``document_id``, ``document_hash``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=ONE_DOCUMENT)

    text: str | None = Field(None, description="The document (UTF-8 text).")
    document_id: DocId | None = None
    document_hash: Hash | None = None
    source: str | None = Field(None, max_length=1000, description="Where the document comes from (free text).")


class CalibrateRequest(CalibrationParamsIn, DocumentIn):
    mode: Literal["predict", "full", "compress"] = Field(
        "full", description="predict: features + predictor, synchronous; full: fidelity curve + r*, asynchronous "
                            "(202 + job URL); compress: the compressed KV cache as safetensors.")
    ratio: Ratio | None = Field(None, description="compress only: an explicit ratio instead of the document's "
                                                  "profile (or prediction) at τ.")


ONE_BUDGET_INPUT = {"oneOf": [{"required": ["text"]}, {"required": ["document_id"]}, {"required": ["document_hash"]},
                              {"required": ["token_ids"]}]}


class BudgetRequest(CalibrationParamsIn, DocumentIn):
    """Exactly one of ``text``, ``document_id``, ``document_hash`` or ``token_ids``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=ONE_BUDGET_INPUT)

    token_ids: list[StrictInt] | None = Field(
        None, description="The exact context token ids a server prefills (instead of a document): their stored "
                          "profile (by token_ids_hash), else a prediction from one prefill of exactly these ids "
                          "(prompt_format.kind = token_ids). Integers in the model's vocabulary, at most the "
                          "document token limit.")
    include_positions: bool = Field(False, description="Also return `kept_positions`.")


class ModelShapeOut(BaseModel):
    """The model's shape in the dtype the budget was measured in."""

    layers: int
    kv_heads: int
    query_heads: int
    head_dim: int
    dtype: str = Field(description="fp32 | bf16 | fp16: weights and cached keys/values.")
    model_type: str


class PromptFormatOut(BaseModel):
    """The prompt layout of the context token ids the budget was measured on."""

    kind: Literal["chat_template", "token_ids"] = Field(
        description="chat_template: kvcalib's prompt (the model's chat template up to the user turn, then the "
                    "document: `Engine.prompt(text, question).context_ids`); token_ids: exactly the ids sent.")
    model: str
    context_tokens: int
    doc_start: int | None = Field(None, description="Where the document starts in the ids (null: unknown, a "
                                                     "profile stored before the ids were recorded).")
    ids_hash: str | None = Field(None, description="token_ids_hash(model, ids): SHA-256 over the model name, one "
                                                   "NUL byte and the ids as int32 little-endian.")


class KeptPositionsOut(BaseModel):
    """The kept positions (``calib.integrations.servers.encode_kept_positions``; ``decode_kept_positions`` inverts
    it): run-length ranges [start, end) per (layer, kv head), or per layer when ``per_layer`` (allocator
    per_layer: every head of a layer keeps the same positions)."""

    n: int = Field(description="Context positions.")
    layers: int
    kv_heads: int
    per_layer: bool
    ranges: list[Any] = Field(description="per_layer: [[[start, end], ...] per layer]; else [[[[start, end], ...] "
                                          "per head] per layer].")


class BudgetOut(BaseModel):
    source: Literal["profile", "predicted"] = Field(description="A stored calibration, or the predictor.")
    document_hash: str | None = Field(description="SHA-256 of the document text (null: predicted from token ids).")
    model: str
    model_revision: str | None = None
    method: str
    allocator: str
    tolerance: float
    ratio: float = Field(description="Compression ratio to apply (r*).")
    token_budget: int = Field(description="Average kept positions per (layer, kv head).")
    context_tokens: int
    layer_budgets: list[int] = Field(description="Kept positions per layer (sum over heads).")
    head_budgets: list[list[int]] = Field(description="Kept positions per (layer, kv head).")
    profile_id: int | None = None
    predictor_version: str | None = None
    document_id: int | None = None
    ids_hash: str | None = Field(None, description="token_ids_hash of the context token ids the budget was measured "
                                                   "on (null: a profile stored before they were recorded).")
    dtype: str | None = Field(None, description="The dtype the budget was measured in.")
    model_shape: ModelShapeOut | None = None
    prompt_format: PromptFormatOut | None = None
    kept_positions: KeptPositionsOut | None = Field(
        None, description="Only with include_positions=true (null also for profiles stored without them).")


class PredictOut(BudgetOut):
    features: dict[str, Any] | None = Field(None, description="The document's features fed to the predictor.")


SERVED_RATIO = ("The ratio the profile serves, which its budgets realise: the risk controller's ratio (expected "
                "answer loss ≤ ε over contexts like its calibration set; the controller is predictor_version), or "
                "r* where no controller fits the calibration.")


class ProfileSummary(BaseModel):
    profile_id: int
    r_star: float
    ratio: float = Field(description=SERVED_RATIO)
    token_budget: int
    context_tokens: int
    monotone: bool
    seconds: float | None = None


class CalibrationKeyOut(BaseModel):
    """Fields of jobs and profiles alike: what was calibrated (document, model, parameters). Listed as the first
    base (``JobOut(CalibrationKeyOut, _JobHead)``): pydantic orders fields from the last base to the class itself,
    so they follow the head's fields in the JSON, where they always stood."""

    document_id: int
    document_hash: str
    model: str
    model_revision: str
    method: str
    allocator: str
    tolerance: float


class _JobHead(BaseModel):
    id: int
    url: str
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: float
    message: str | None = None
    error: str | None = None
    attempts: int


class JobOut(CalibrationKeyOut, _JobHead):
    params_hash: str
    params: dict[str, Any]
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    result: ProfileSummary | None = None
    profile_url: str | None = None
    dtype: str | None = Field(None, description="The dtype the job runs the model in.")
    device: str | None = Field(None, description="The device the job runs the model on (null: the worker's "
                                                 "KVCALIB_WORKER_DEVICE).")


class CurvePointOut(BaseModel):
    ratio: float
    fidelity: float
    kl: float | None = None


class _ProfileHead(BaseModel):
    id: int
    job_id: int


class ProfileOut(CalibrationKeyOut, _ProfileHead):
    r_star: float = Field(description="Largest ratio whose label-free fidelity stays >= the tolerance.")
    ratio: float = Field(description=SERVED_RATIO)
    token_budget: int
    context_tokens: int
    monotone: bool
    layer_budgets: list[int]
    head_budgets: list[list[int]]
    features: dict[str, Any]
    predictor_version: str | None = Field(None, description="The risk controller that set `ratio` (null: ratio = "
                                                            "r*).")
    seconds: float | None = None
    created_at: dt.datetime
    params: dict[str, Any]
    curve: list[CurvePointOut]
    curve_png_url: str
    dtype: str | None = None
    ids_hash: str | None = Field(None, description="token_ids_hash of the calibration's context token ids.")


class BatchDocument(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=ONE_DOCUMENT)

    text: str | None = None
    document_id: DocId | None = None
    document_hash: Hash | None = None
    source: str | None = Field(None, max_length=1000)


class BatchRequest(CalibrationParamsIn):
    documents: list[BatchDocument | str] = Field(min_length=1, description="Documents: objects or plain strings.")


class BatchItemOut(BaseModel):
    position: int
    job_id: int
    status: str
    progress: float
    error: str | None = None
    profile_id: int | None = None
    document_hash: str


class BatchOut(BaseModel):
    id: int
    url: str
    total: int
    counts: dict[str, int]
    progress: float
    done: bool
    status: str
    params: dict[str, Any]
    created_at: dt.datetime
    items: list[BatchItemOut] | None = None


class Health(BaseModel):
    status: str = "ok"
    version: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, str]
    execution: str


class ErrorOut(BaseModel):
    detail: Any


class DocumentDeletedOut(BaseModel):
    """What ``DELETE /documents/{id}`` removed."""

    document_id: int
    document_hash: str
    runs: int = Field(description="Calibration runs (jobs) deleted.")
    profiles: int
    curve_points: int
    batch_items: int = Field(description="Batch entries of the deleted jobs (the batches themselves stay).")
    predictions: int = Field(0, description="Stored predictions of the document's hash.")


class PredictorOut(BaseModel):
    """A predictor the service knows (``GET /predictors``, ``POST /predictors``)."""

    name: str | None = Field(None, description="Its entry in a predictor folder's manifest (shipped, configured).")
    version: str = Field(description="`{kind}-{parameter hash}-{created}`: what predictions record.")
    kind: str | None = None
    model: str | None = Field(None, description="The model it answers for (null: any model).")
    source: Literal["shipped", "configured", "registered"] = Field(
        description="shipped: package data; configured: KVCALIB_PREDICTOR_PATH; registered: POST /predictors (or "
                    "configured earlier).")
    training_config: dict[str, Any] = Field(
        description="What it was trained for (method, allocator, tolerance): it only answers such requests.")
    metrics: dict[str, Any]
    default: bool = Field(description="Serves its model at the default method, allocator and tolerance.")
    created_at: dt.datetime | None = Field(None, description="When the store recorded it (null: never served).")


class PredictorsOut(BaseModel):
    predictors: list[PredictorOut]
    defaults: dict[str, str] = Field(description="Model → version of the predictor answering it at the default "
                                                 "method, allocator and tolerance (`fallback-…`: none fits).")


class PredictionOut(BaseModel):
    """A stored prediction: one per document hash, model, parameters and predictor version."""

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
    predictor_kind: str | None = None
    features: dict[str, Any]
    created_at: dt.datetime
    ids_hash: str | None = Field(None, description="token_ids_hash of the context token ids it was predicted from "
                                                   "(a prediction from token ids: also its document_hash).")
    dtype: str | None = None


class PredictionsOut(BaseModel):
    predictions: list[PredictionOut] = Field(description="Newest first.")
