"""The predictor interface, the feature matrix, and the JSON (de)serialisation registry.

Every predictor file holds its kind, fitted parameters, training metrics and a version
``{kind}-{sha256(params)[:12]}-{UTC timestamp}``; ``predictor_from_json`` re-hashes the parameters and refuses a file
whose hash does not match, so nothing is ever unpickled. Kinds register themselves with ``register``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime
from typing import ClassVar, TypeVar

import numpy as np

from kvcalib.calib.errors import KvcalibError

FORMAT = "kvcalib.predictor"
MANIFEST_FORMAT = "kvcalib.predictors"
FORMAT_VERSION = 1
R_MAX = 0.95
_PER_LAYER = re.compile(r"_l\d+$")


class PredictorError(KvcalibError):
    pass


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def feature_matrix(features: list[dict], names: list[str], fill: dict[str, float] | None = None) -> np.ndarray:
    """(n, len(names)) float64; missing or non-finite values take ``fill[name]`` (else NaN)."""
    fill = fill or {}
    x = np.full((len(features), len(names)), np.nan)
    for i, f in enumerate(features):
        for j, k in enumerate(names):
            v = f.get(k) if isinstance(f, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                x[i, j] = float(v)
            elif k in fill:
                x[i, j] = fill[k]
    return x


def default_feature_names(features: list[dict], per_layer: bool = False) -> list[str]:
    """Numeric features present in every record (per-layer ``*_l{i}`` ones only with ``per_layer``)."""
    if not features:
        return []
    common = set(features[0])
    for f in features[1:]:
        common &= set(f)
    return sorted(k for k in common if per_layer or not _PER_LAYER.search(k))


class Predictor:
    """Maps context features to a recommended compression ratio r̂; subclasses give ``params`` /
    ``from_params`` (their JSON form) and ``predict``."""

    kind: ClassVar[str] = "base"

    def __init__(self) -> None:
        self.created = _now()
        self.metrics: dict = {}
        self.training: dict = {}  # config of the labels, split sizes, ...

    # -- to implement
    def params(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_params(cls, params: dict) -> Predictor:
        raise NotImplementedError

    def predict(self, features: list[dict]) -> np.ndarray:
        raise NotImplementedError

    # -- shared
    def content_hash(self) -> str:
        return hashlib.sha256(_canon({"kind": self.kind, "params": self.params()}).encode()).hexdigest()

    @property
    def version(self) -> str:
        return f"{self.kind}-{self.content_hash()[:12]}-{self.created}"

    def training_config(self) -> dict:
        return dict(self.training.get("config") or {})

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind, "version": self.version,
                "created": self.created, "content_hash": self.content_hash(), "params": self.params(),
                "metrics": self.metrics, "training": self.training}

    def predict_one(self, features: dict) -> float:
        return float(self.predict([features])[0])


KINDS: dict[str, type[Predictor]] = {}  # kind -> class, filled by ``register`` as the kinds' modules are imported
P = TypeVar("P", bound=type[Predictor])


def register(cls: P) -> P:
    """Class decorator: make ``cls`` loadable from JSON under ``cls.kind``."""
    KINDS[cls.kind] = cls
    return cls


def predictor_from_json(d: dict) -> Predictor:
    """Rebuild a predictor from its JSON object (validated: format, kind, parameter hash)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise PredictorError("not a kvcalib predictor file (missing format 'kvcalib.predictor')")
    if d.get("format_version") != FORMAT_VERSION:
        raise PredictorError(f"unsupported predictor format version {d.get('format_version')!r}")
    kind = d.get("kind")
    if kind not in KINDS:
        raise PredictorError(f"unknown predictor kind {kind!r}: expected one of {sorted(KINDS)}")
    params = d.get("params")
    if not isinstance(params, dict):
        raise PredictorError("predictor file has no parameters")
    try:
        pred = KINDS[kind].from_params(params)
    except (KeyError, TypeError, ValueError) as exc:
        raise PredictorError(f"invalid {kind} predictor parameters: {exc}") from None
    if pred.content_hash() != d.get("content_hash"):
        raise PredictorError("predictor parameters do not match their content hash (file modified or corrupt)")
    pred.created = str(d.get("created", pred.created))
    pred.metrics = d.get("metrics") or {}
    pred.training = d.get("training") or {}
    return pred
