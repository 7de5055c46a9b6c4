"""Validation of requests against the registries, the settings' limits and the store: calibration parameters (names,
tolerance, method hyperparameters → a ``CalibrationConfig``) and documents (text limits, token limits, stored
references → a ``ResolvedDocument``). Every failure is a ``KvcalibError`` (HTTP 4xx), never a later 500."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from kvcalib.calib.data.documents import content_hash
from kvcalib.calib.errors import KvcalibError
from kvcalib.service import repository as repo
from kvcalib.service.errors import NotFoundError, ServiceInputError, TooLargeError
from kvcalib.service.inputs import (
    MAX_SOURCE_CHARS,
    CalibrationParams,
    DocumentInput,
    check_document_hash,
    check_document_id,
    check_string,
    validate_text,
)
from kvcalib.service.orm import Document
from kvcalib.service.runtime import ModelInfo, check_model_name

if TYPE_CHECKING:
    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.settings import Settings

CONTEXT_RESERVE = 512  # tokens kept free of the model's context for the chat template, probes and questions


@dataclass(frozen=True)
class ResolvedDocument:
    """A request's document once checked: its stored row (None when not persisted), text, hash and token count."""

    row: Document | None
    text: str
    content_hash: str
    tokens: int


def check_names(model: str, method: str | None, allocator: str | None) -> None:
    """Name validation only (no model loading): unknown names are a 422 listing the valid choices."""
    from kvcalib.calib.budget import available_allocators
    from kvcalib.calib.scorers import UnknownMethodError, available_methods

    check_model_name(model)
    if method is not None and method not in available_methods():
        raise UnknownMethodError(f"unknown method {method!r}: expected one of {available_methods()}")
    if allocator is not None and allocator not in available_allocators():
        raise ServiceInputError(f"unknown allocator {allocator!r}: expected one of {available_allocators()}")


def check_dtype(dtype: Any) -> str:
    """fp32 | bf16 | fp16, else a 422 listing them."""
    from kvcalib.service.runtime import DTYPES

    if dtype not in DTYPES:
        raise ServiceInputError(f"unknown dtype {_short(dtype)}: expected one of {list(DTYPES)}")
    return dtype


def check_device(device: Any, settings: Settings, local: bool = True) -> str:
    """A request's device: cpu, cuda or cuda:N (else a 422), one of the deployment's ``allowed_devices`` (else a 422
    naming them) and, when ``local`` (this process runs the model), a device this process has (else a 422 saying
    what is missing)."""
    import re

    from kvcalib.settings import DEVICE_PATTERN

    if not isinstance(device, str) or re.fullmatch(DEVICE_PATTERN, device) is None:
        raise ServiceInputError(f"unknown device {_short(device)}: expected cpu, cuda or cuda:N")
    if local:
        from kvcalib.service.runtime import device_problem

        problem = device_problem(device)
        if problem is not None:
            raise ServiceInputError(problem)
    if device not in settings.devices:
        raise ServiceInputError(f"device {device!r} is not allowed on this server: allowed devices are "
                                f"{settings.devices} (KVCALIB_ALLOWED_DEVICES)")
    return device


def check_token_ids(ids: Any, info: ModelInfo, limit: int) -> list[int]:
    """The token ids of a request (what a server prefills): a non-empty list of integers in [0, vocab size) of the
    model, at most ``limit`` long (the text path's token limit, 413 past it); anything else is a 422 naming the
    first bad id."""
    if not isinstance(ids, (list, tuple)):
        raise ServiceInputError("`token_ids` must be a list of integers")
    if not ids:
        raise ServiceInputError("`token_ids` is empty")
    if len(ids) > limit:
        raise TooLargeError(f"`token_ids` holds {len(ids)} ids for model {info.name!r}, over the limit of {limit} "
                            f"tokens (KVCALIB_MAX_DOCUMENT_TOKENS, and the model's context of {info.max_positions} "
                            f"minus {CONTEXT_RESERVE} reserved)")
    vocab = info.vocab_size
    for i, v in enumerate(ids):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ServiceInputError(f"token id {i} is {_short(v)}: token ids must be integers")
        if not 0 <= v < vocab:
            raise ServiceInputError(f"token id {i} is {_short(v)}: outside the vocabulary of model {info.name!r} "
                                    f"([0, {vocab}))")
    return [int(v) for v in ids]


MAX_POSITIONS = 1 << 20  # windows and protected counts beyond any context the service accepts
# Ranges [lo, hi] of the methods' integer and float hyperparameters, by name (the same name means the same thing
# in every method): windows, kernels and sink counts > 0, protected counts ≥ 0, ridge ρ ≥ 0. Values outside are a
# 422 before any work — inside a worker they would fail the job, or (n_pseudo) cost seconds of CPU per token.
PARAM_RANGES: dict[str, tuple[float, float]] = {
    "window": (1, MAX_POSITIONS), "draft_window": (1, MAX_POSITIONS), "local_window": (1, MAX_POSITIONS),
    "obs_window": (0, MAX_POSITIONS), "kernel": (1, 255), "pool_kernel": (1, 255), "sinks": (1, MAX_POSITIONS),
    "protect_first": (0, MAX_POSITIONS), "protect_last": (0, MAX_POSITIONS), "sketch_dim": (1, 4096),
    "projection_dim": (1, 4096), "chunk": (1, MAX_POSITIONS), "seed": (0, 2**32 - 1), "rho": (0.0, 1e12),
    "blend": (0.0, 1e6),
}
PSEUDO_TOKENS = "n_pseudo"  # capped by KVCALIB_MAX_PSEUDO_TOKENS


def param_choices() -> dict[str, tuple[str, ...]]:
    """The valid values of the methods' string hyperparameters, by name."""
    from kvcalib.calib.budget import available_allocators
    from kvcalib.calib.scorers.curdkv import LEVERAGES
    from kvcalib.calib.scorers.obcache import SALIENCIES

    return {"pooling": ("max", "avg"), "gqa": ("mean", "sum", "max"), "leverage": tuple(LEVERAGES),
            "saliency": tuple(SALIENCIES), "draft_allocator": tuple(available_allocators())}


def check_method_params(method: str, params: Any, max_pseudo_tokens: int = 32) -> None:
    """Method hyperparameters must have the type of their default (a string where an int is expected would only
    fail later, inside a worker) and lie in their range (``PARAM_RANGES``, ``param_choices``)."""
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
    ranges = dict(PARAM_RANGES, **{PSEUDO_TOKENS: (1, max_pseudo_tokens)})
    choices = param_choices()
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
                                    f"(default {d!r}), got {_short(v)}")
        if k in ranges and not isinstance(d, bool):
            lo, hi = ranges[k]
            if not lo <= v <= hi:
                limit = " (KVCALIB_MAX_PSEUDO_TOKENS)" if k == PSEUDO_TOKENS else ""
                raise ServiceInputError(f"method parameter {k!r} of {method!r} must lie in [{lo}, {hi}]{limit}, "
                                        f"got {_short(v)}")
        if k in choices and isinstance(d, str) and v not in choices[k]:
            raise ServiceInputError(f"method parameter {k!r} of {method!r} must be one of {list(choices[k])}, "
                                    f"got {_short(v)}")


def _short(v: Any) -> str:
    """A value for an error message: never a huge integer's 4300-digit conversion, never a megabyte string."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**30:
        return f"an integer of about {v.bit_length()} bits"
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


class RequestValidator:
    """Checks request parameters and documents against the settings (defaults, byte and token limits)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def params(self, model: str | None = None, method: str | None = None, allocator: str | None = None,
               tolerance: float | None = None, options: dict[str, Any] | None = None,
               dtype: str | None = None, device: str | None = None) -> CalibrationParams:
        """``device`` (None: the executing process's worker device) is checked against the allowed devices and,
        when jobs run in this process (embedded), against the devices it has; synchronous paths check the latter
        themselves (``check_local_device``)."""
        s = self.settings
        p = CalibrationParams(model=model or s.default_model, method=method or s.default_method,
                              allocator=allocator or s.default_allocator,
                              tolerance=s.default_tolerance if tolerance is None else float(tolerance),
                              options={k: v for k, v in (options or {}).items() if v is not None},
                              dtype=check_dtype(dtype or s.worker_dtype),
                              device=None if device is None else check_device(device, s, local=s.embedded))
        check_names(p.model, p.method, p.allocator)
        if not 0.0 < p.tolerance <= 1.0:
            raise ServiceInputError(f"tolerance must be in (0, 1], got {p.tolerance}")
        from kvcalib.service.promoted import with_promoted_params  # a promoted sweep result: the default parameters

        p.options = with_promoted_params(p.options, p.model, p.method, p.allocator, s.data_dir)
        return p

    def check_local_device(self, p: CalibrationParams) -> None:
        """A synchronous request runs its model in this process: its device must exist here (else a 422)."""
        if p.device is not None:
            check_device(p.device, self.settings, local=True)

    def config(self, p: CalibrationParams) -> CalibrationConfig:
        """The validated ``CalibrationConfig`` of request parameters (its errors are KvcalibErrors → 422)."""
        from kvcalib.calib.calibration.calibrate import CalibrationConfig

        d = dict(p.options)
        d.update(method=p.method, allocator=p.allocator, tolerance=p.tolerance)
        check_method_params(p.method, d.get("method_params") or {}, self.settings.max_pseudo_tokens)
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

    def check_tokens(self, text: str, info: ModelInfo) -> int:
        n = info.count_tokens(text)
        limit = self.token_limit(info)
        if n > limit:
            raise TooLargeError(f"document is {n} tokens long for model {info.name!r}, over the limit of {limit} "
                                f"tokens (KVCALIB_MAX_DOCUMENT_TOKENS, and the model's context of "
                                f"{info.max_positions} minus {CONTEXT_RESERVE} reserved)")
        return n

    @staticmethod
    def check_calibratable(tokens: int, config: CalibrationConfig) -> None:
        """A full calibration needs room for its probes (cue + target tokens, 4 positions kept clear at the end,
        ``calib.calibration.probes``): shorter documents are refused up front instead of failing in the job."""
        need = config.cue_tokens + config.probe_tokens + 4
        if config.n_probes > 0 and tokens < need:
            raise ServiceInputError(f"document is {tokens} tokens long: a full calibration needs at least {need} "
                                    f"(cue_tokens {config.cue_tokens} + probe_tokens {config.probe_tokens} + 4); "
                                    "use mode=predict for shorter documents")

    def document(self, s: Session, doc: DocumentInput, info: ModelInfo, persist: bool = True,
                 keep_text: bool = True) -> ResolvedDocument:
        """The request's document: its text checked (and stored when ``persist``), or the stored document it names.
        ``keep_text=False`` stores the document by hash and size only when the settings ask for it
        (``store_document_text``); full calibrations keep the text, which their job reads."""
        given = [x is not None for x in (doc.text, doc.document_id, doc.document_hash)]
        if sum(given) != 1:
            raise ServiceInputError("give exactly one of `text`, `document_id` or `document_hash`")
        if doc.source is not None:
            check_string(doc.source, "`source`", MAX_SOURCE_CHARS)
        if doc.text is not None:
            data = validate_text(doc.text, self.settings.max_document_bytes)
            n = self.check_tokens(doc.text, info)
            h = content_hash(doc.text)
            if not persist:
                return ResolvedDocument(row=repo.get_document_by_hash(s, content_hash=h), text=doc.text,
                                        content_hash=h, tokens=n)
            store = keep_text or self.settings.store_document_text
            row = repo.get_or_create_document(s, text=doc.text if store else "", content_hash=h, source=doc.source,
                                              token_count=n)
            if store and row.text != doc.text:  # stored hash-only (or erased): a full job needs the text again
                row.text = doc.text
            if row.n_bytes != len(data):
                row.n_bytes = len(data)
            return ResolvedDocument(row=row, text=doc.text, content_hash=h, tokens=n)
        if doc.document_id is not None:
            row = repo.get_document(s, document_id=check_document_id(doc.document_id))
        else:
            row = repo.get_document_by_hash(s, content_hash=check_document_hash(doc.document_hash))
        if row is None:
            ref = f"id {doc.document_id}" if doc.document_id is not None else f"hash {doc.document_hash}"
            raise NotFoundError(f"no stored document with {ref}: send its `text` instead")
        if not row.text:
            raise ServiceInputError(f"the text of document {row.id} is not stored (KVCALIB_STORE_DOCUMENT_TEXT=false "
                                    "keeps hashes only, or it was erased): send its `text` instead")
        n = self.check_tokens(row.text, info)
        return ResolvedDocument(row=row, text=row.text, content_hash=row.content_hash, tokens=n)
