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
from kvcalib.service.inputs import CalibrationParams, DocumentInput, validate_text
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


def check_method_params(method: str, params: Any) -> None:
    """Method hyperparameters must have the type of their default (a string where an int is expected would only
    fail later, inside a worker)."""
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


class RequestValidator:
    """Checks request parameters and documents against the settings (defaults, byte and token limits)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def params(self, model: str | None = None, method: str | None = None, allocator: str | None = None,
               tolerance: float | None = None, options: dict[str, Any] | None = None) -> CalibrationParams:
        s = self.settings
        p = CalibrationParams(model=model or s.default_model, method=method or s.default_method,
                              allocator=allocator or s.default_allocator,
                              tolerance=s.default_tolerance if tolerance is None else float(tolerance),
                              options={k: v for k, v in (options or {}).items() if v is not None})
        check_names(p.model, p.method, p.allocator)
        if not 0.0 < p.tolerance <= 1.0:
            raise ServiceInputError(f"tolerance must be in (0, 1], got {p.tolerance}")
        from kvcalib.sweep.promotion import with_promoted_params  # a promoted sweep result: the default parameters

        p.options = with_promoted_params(p.options, p.model, p.method, p.allocator, s.data_dir)
        return p

    @staticmethod
    def config(p: CalibrationParams) -> CalibrationConfig:
        """The validated ``CalibrationConfig`` of request parameters (its errors are KvcalibErrors → 422)."""
        from kvcalib.calib.calibration.calibrate import CalibrationConfig

        d = dict(p.options)
        d.update(method=p.method, allocator=p.allocator, tolerance=p.tolerance)
        check_method_params(p.method, d.get("method_params") or {})
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

    def document(self, s: Session, doc: DocumentInput, info: ModelInfo, persist: bool = True) -> ResolvedDocument:
        """The request's document: its text checked (and stored when ``persist``), or the stored document it names."""
        given = [x is not None for x in (doc.text, doc.document_id, doc.document_hash)]
        if sum(given) != 1:
            raise ServiceInputError("give exactly one of `text`, `document_id` or `document_hash`")
        if doc.text is not None:
            validate_text(doc.text, self.settings.max_document_bytes)
            n = self.check_tokens(doc.text, info)
            h = content_hash(doc.text)
            row = (repo.get_or_create_document(s, text=doc.text, content_hash=h, source=doc.source, token_count=n)
                   if persist else repo.get_document_by_hash(s, content_hash=h))
            return ResolvedDocument(row=row, text=doc.text, content_hash=h, tokens=n)
        if doc.document_id is not None:
            row = repo.get_document(s, document_id=doc.document_id)
        else:
            row = repo.get_document_by_hash(s, content_hash=doc.document_hash)
        if row is None:
            ref = f"id {doc.document_id}" if doc.document_id is not None else f"hash {doc.document_hash}"
            raise NotFoundError(f"no stored document with {ref}: send its `text` instead")
        n = self.check_tokens(row.text, info)
        return ResolvedDocument(row=row, text=row.text, content_hash=row.content_hash, tokens=n)
