"""Request inputs of the service: the document and calibration parameters of a request, and the checks of raw input
(document text, uploads, JSONL corpora) that need neither a model nor the database."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvcalib.calib.data.jsonl import iter_jsonl
from kvcalib.service.errors import ServiceInputError, TooLargeError

if TYPE_CHECKING:
    from kvcalib.calib.calibration.calibrate import CalibrationConfig

MAX_ID = 2**63 - 1  # ids are BIGINT on PostgreSQL: larger integers are invalid ids, not database overflows
MAX_SOURCE_CHARS = 1000  # documents.source
HASH_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass
class DocumentInput:
    """One document of a request: its text, or a reference to a stored document."""

    text: str | None = None
    document_id: int | None = None
    document_hash: str | None = None
    source: str | None = None


@dataclass
class CalibrationParams:
    """The validated calibration parameters of a request (``Service.params``)."""

    model: str
    method: str
    allocator: str
    tolerance: float
    options: dict[str, Any] = field(default_factory=dict)  # CalibrationConfig overrides (ratios, n_probes, …)
    dtype: str = "fp32"  # fp32 | bf16 | fp16: the dtype the model runs in (default: KVCALIB_WORKER_DTYPE)
    # cpu | cuda | cuda:N: where the model runs (None: the executing process's KVCALIB_WORKER_DEVICE). Not part of the
    # parameters hash: a profile computed on cuda serves cpu requests too.
    device: str | None = None

    @property
    def custom_method_params(self) -> bool:
        """Whether the caller chose the method's hyperparameters (their failures are then input errors)."""
        return bool(self.options.get("method_params"))


DEFAULT_DTYPE = "fp32"


def params_hash(config: CalibrationConfig, dtype: str | None) -> str:
    """The parameters hash of a run or a prediction: ``config.params_hash()`` in fp32 (the hash rows had before
    dtypes were recorded), else the SHA-256 of that hash and the dtype — a bf16 calibration is another run."""
    base = config.params_hash()
    if dtype in (None, DEFAULT_DTYPE):
        return base
    return hashlib.sha256(f"{base}:dtype={dtype}".encode()).hexdigest()


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


def check_string(value: Any, what: str, max_chars: int | None = None) -> str:
    """A string the store can hold on SQLite and PostgreSQL alike: valid Unicode (no lone surrogates), no NUL
    characters (PostgreSQL text cannot hold them), at most ``max_chars`` characters."""
    if not isinstance(value, str):
        raise ServiceInputError(f"{what} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ServiceInputError(f"{what} is not valid Unicode (lone surrogate at {exc.start})") from exc
    if "\x00" in value:
        raise ServiceInputError(f"{what} contains NUL characters")
    if max_chars is not None and len(value) > max_chars:
        raise ServiceInputError(f"{what} is {len(value)} characters long, over the limit of {max_chars}")
    return value


def check_document_id(value: Any, what: str = "`document_id`") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_ID:
        raise ServiceInputError(f"{what} must be an integer in [1, 2^63 - 1], got {str(value)[:40]}")
    return value


def check_document_hash(value: Any, what: str = "`document_hash`") -> str:
    if not isinstance(value, str) or HASH_PATTERN.fullmatch(value) is None:
        raise ServiceInputError(f"{what} must be the SHA-256 of the text: 64 lowercase hex digits")
    return value


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
            docs.append(_document_of_object(no, obj))
        else:
            raise ServiceInputError(f"line {no}: expected a JSON object or string")
        if len(docs) > max_documents:
            raise TooLargeError(f"a batch holds at most {max_documents} documents (KVCALIB_MAX_BATCH_DOCUMENTS)")
    if not docs:
        raise ServiceInputError("the corpus holds no documents")
    return docs


def _document_of_object(no: int, obj: dict[str, Any]) -> DocumentInput:
    t = obj.get("text")
    did, dh = obj.get("document_id"), obj.get("document_hash")
    src = obj.get("source", obj.get("id"))
    if t is not None and not isinstance(t, str):
        raise ServiceInputError(f"line {no}: `text` must be a string")
    if did is not None:
        check_document_id(did, f"line {no}: `document_id`")
    if dh is not None:
        check_document_hash(dh, f"line {no}: `document_hash`")
    if src is not None:  # `id` may be any JSON scalar (a number, …): stored as its text
        src = check_string(src if isinstance(src, str) else str(src), f"line {no}: `source`/`id`")[:MAX_SOURCE_CHARS]
    return DocumentInput(text=t, document_id=did, document_hash=dh, source=src)
