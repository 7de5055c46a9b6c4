"""Predictor choice of the service, and the record of its predictions.

A request for (model, method, allocator, τ) is answered by the first of:

1. the configured predictor (``KVCALIB_PREDICTOR_PATH``, a folder or file of ``calib.predictors``);
2. the newest predictor stored in the ``predictors`` table — registered through ``POST /predictors``, or configured
   earlier — bound to the request's model or to none;
3. the predictor shipped with the package for the request's model (``calib.predictors.bundled``: package data,
   versioned), so a fresh install recommends a document-dependent ratio;
4. the documented fallback — the median stored r* of this deployment, else Compactor's parametric curve with neutral
   parameters (r = 1 − τ);

each only when it was trained for the request's method, allocator and τ (``predictor_fits``). The configured and
shipped predictors are recorded in the ``predictors`` table the first time they serve; every predicted budget is
stored in ``predictions`` (``Predictors.store``), once per document hash, model, parameters and predictor."""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from kvcalib.calib.errors import KvcalibError
from kvcalib.service import repository as repo
from kvcalib.service.db import Database
from kvcalib.service.errors import ServiceInputError
from kvcalib.service.inputs import CalibrationParams, check_string
from kvcalib.service.views import PredictionView, PredictorInfo, PredictorListing, PredictorSource

if TYPE_CHECKING:
    import numpy as np

    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.service.orm import Predictor as PredictorRow
    from kvcalib.settings import Settings

log = logging.getLogger("kvcalib.service")

MAX_VERSION_CHARS = 100  # predictors.version


class RatioPredictor(Protocol):
    """What the service needs of a predictor: ``kvcalib.calib.predictors.Predictor`` or ``FallbackPredictor``."""

    kind: str

    @property
    def version(self) -> str: ...

    @property
    def metrics(self) -> dict[str, Any]: ...

    def training_config(self) -> dict[str, Any]: ...

    def predict(self, features: list[dict[str, float]]) -> Sequence[float] | np.ndarray: ...


class FallbackPredictor:
    """The documented fallback (a ``RatioPredictor``): the median stored r* for the request's (model, method,
    allocator, τ); with no stored profile, ``ParametricPredictor`` (Compactor's curve) with b = 0, i.e. r = 1 − τ."""

    kind = "fallback"

    def __init__(self, r_stars: Sequence[float], tolerance: float):
        self.n = len(r_stars)
        if self.n:
            self.value = float(statistics.median(r_stars))
            self.version = f"fallback-store-median-n{self.n}"
        else:
            from kvcalib.calib.predictors import ParametricPredictor

            self.value = float(ParametricPredictor(alpha=0.0, beta=0.0, tau=tolerance).ratio_for_nll([0.0])[0])
            self.version = "fallback-parametric-b0"
        self.metrics: dict[str, Any] = {"n_profiles": self.n, "ratio": self.value}

    def training_config(self) -> dict[str, Any]:
        return {}

    def predict(self, features: list[dict[str, float]]) -> list[float]:
        return [self.value for _ in features]


@dataclass(frozen=True)
class RequestKey:
    """What a predictor must have been trained for (the fields of ``CalibrationConfig`` that ``predictor_fits``
    reads)."""

    method: str
    allocator: str
    tolerance: float


def _trained(predictor: RatioPredictor) -> dict[str, Any]:
    try:
        trained = predictor.training_config() or {}
    except Exception:  # noqa: BLE001
        return {}
    return trained if isinstance(trained, dict) else {}


def is_controller(trained: dict[str, Any]) -> bool:
    """A risk controller over a calibration's r* (``mode=full``: its training config names a fidelity) reads the
    calibration's r*, not the features of a prefill: it never answers a prediction."""
    return "fidelity" in trained


def config_fits(trained: dict[str, Any], config: CalibrationConfig | RequestKey) -> bool:
    """A training configuration answers for a prediction request when it is no risk controller over r* and each of
    its method, allocator and τ (those it records) equals the request's."""
    return not is_controller(trained) and all(trained[k] == getattr(config, k)
                                              for k in ("method", "allocator", "tolerance") if k in trained)


def predictor_fits(predictor: RatioPredictor, config: CalibrationConfig | RequestKey) -> bool:
    """A trained predictor only answers for the (method, allocator, τ) it was trained on."""
    return config_fits(_trained(predictor), config)


def model_fits(bound: str | None, model: str) -> bool:
    return bound is None or bound == model


@dataclass(frozen=True)
class Choice:
    """The predictor chosen for a request, and where it comes from."""

    predictor: RatioPredictor
    source: PredictorSource | None  # None: the fallback
    name: str | None = None
    artefact_path: str | None = None
    model: str | None = None  # the model it is bound to (None: any)


def parse_predictor(document: Any):
    """A predictor from its JSON object (``Predictor.to_json()``), validated: format, kind, parameters and their
    content hash (``predictor_from_json``), and the shape of its metrics and training record. Every failure is a
    ``ServiceInputError`` (HTTP 422) with the reason, never a crash."""
    import kvcalib.calib.predictors  # noqa: F401 - registers every kind for JSON loading
    from kvcalib.calib.predictors.base import predictor_from_json

    if not isinstance(document, dict):
        raise ServiceInputError(f"a predictor is a JSON object (as written by `kvcalib fit`), got "
                                f"{type(document).__name__}")
    for key in ("metrics", "training"):
        if document.get(key) is not None and not isinstance(document[key], dict):
            raise ServiceInputError(f"predictor `{key}` must be an object, got {type(document[key]).__name__}")
    config = (document.get("training") or {}).get("config")
    if config is not None and not isinstance(config, dict):
        raise ServiceInputError(f"predictor `training.config` must be an object, got {type(config).__name__}")
    try:
        pred = predictor_from_json(document)
        version = pred.version
        json.dumps(pred.to_json(), allow_nan=False)  # stored as JSON: no NaN / infinity anywhere
    except KvcalibError as exc:
        raise ServiceInputError(f"invalid predictor: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - malformed parameters of any kind are the caller's input
        raise ServiceInputError(f"invalid predictor: {type(exc).__name__}: {str(exc)[:200]}") from None
    check_string(version, "predictor version", MAX_VERSION_CHARS)
    return pred


class Predictors:
    """The predictors a service answers with (see the module docstring), each loaded once per process."""

    def __init__(self, db: Database, settings: Settings):
        self.db, self.settings = db, settings
        self._lock = threading.Lock()
        self._cache: dict[str, RatioPredictor] = {}  # "path:<path>" | "version:<version>" → loaded predictor
        self._broken: set[str] = set()  # stored predictors that failed to load (logged once)
        self._recorded: set[str] = set()  # versions this process recorded in the predictors table
        self._names: dict[str, str | None] = {}  # "path:<path>" → the configured predictor's name

    # ------------------------------------------------------------------------------------------------ sources
    def configured(self) -> RatioPredictor | None:
        """The predictor of ``KVCALIB_PREDICTOR_PATH`` (loaded once), else None."""
        path = self.settings.predictor_path
        if path is None:
            return None
        key = f"path:{path}"
        with self._lock:
            if key not in self._cache:
                from kvcalib.calib.predictors import load_predictor

                self._cache[key] = load_predictor(path)
            return self._cache[key]

    def _configured_name(self) -> str | None:
        """The manifest entry (or file stem) of the configured predictor, read once."""
        path = self.settings.predictor_path
        if path is None:
            return None
        key = f"path:{path}"
        if key not in self._names:
            name = Path(path).stem
            if Path(path).is_dir():
                from kvcalib.calib.predictors import load_manifest

                name = load_manifest(path).get("default")
            self._names[key] = name
        return self._names[key]

    def _load_row(self, row: PredictorRow) -> RatioPredictor | None:
        """A stored predictor: its JSON (``artefact``, registered through the API) or its file or folder
        (``artefact_path``); None (logged once) when it cannot be loaded any more."""
        key = f"version:{row.version}"
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            if key in self._broken:
                return None
        try:
            pred = row_predictor(row)
        except Exception:  # noqa: BLE001 - a stale row (file moved, format changed) must not break predictions
            log.warning("stored predictor %s cannot be loaded; skipped", row.version, exc_info=True)
            with self._lock:
                self._broken.add(key)
            return None
        with self._lock:
            return self._cache.setdefault(key, pred)

    def registered(self, model: str, key: CalibrationConfig | RequestKey) -> Choice | None:
        """The newest stored predictor (registered, or configured earlier) bound to ``model`` or to none and trained
        for the request's method, allocator and τ."""
        with self.db.session() as s:
            for row in repo.predictor_candidates(s, model=model):
                if row.training_config is not None and not config_fits(row.training_config, key):
                    continue
                pred = self._load_row(row)
                if pred is None or not predictor_fits(pred, key) or not model_fits(_trained(pred).get("model"),
                                                                                   model):
                    continue
                return Choice(pred, "registered", artefact_path=row.artefact_path, model=row.model)
        return None

    def shipped(self, model: str, key: CalibrationConfig | RequestKey) -> Choice | None:
        """The default predictor shipped for ``model`` when it was trained for the request's method, allocator and
        τ (``calib.predictors.bundled``)."""
        from kvcalib.calib.predictors import bundled

        try:
            folder = bundled.shipped_folder(model, key.method, key.allocator)
            if folder is None:
                return None
            pred = bundled.folder_predictor(folder)
            if not predictor_fits(pred, key):
                return None
            name = bundled.folder_manifest(folder).get("default")
        except Exception:  # noqa: BLE001 - a broken package file: answer with the fallback, say why in the log
            log.warning("the predictor shipped for %s cannot be loaded", model, exc_info=True)
            return None
        return Choice(pred, "shipped", name=name, artefact_path=str(folder) if folder else None, model=model)

    def fallback(self, p: CalibrationParams) -> FallbackPredictor:
        """No (fitting) trained predictor: the median r* of the stored profiles of the same model, method,
        allocator and τ (an empirical prior of this deployment), else Compactor's parametric curve with neutral
        parameters (b = 0: fidelity = retention, hence r = 1 − τ)."""
        return self._fallback(p.model, RequestKey(p.method, p.allocator, p.tolerance))

    def _fallback(self, model: str, key: RequestKey) -> FallbackPredictor:
        with self.db.session() as s:
            values = repo.stored_r_stars(s, model_name=model, method=key.method, allocator=key.allocator,
                                         tolerance=key.tolerance)
        return FallbackPredictor(values, key.tolerance)

    # ------------------------------------------------------------------------------------------------ choice
    def select(self, model: str, key: CalibrationConfig | RequestKey) -> Choice:
        """The predictor answering (model, method, allocator, τ): configured, stored, shipped, else the fallback.
        No side effect but loading."""
        configured = self.configured()
        if configured is not None and predictor_fits(configured, key) and model_fits(
                _trained(configured).get("model"), model):
            return Choice(configured, "configured", name=self._configured_name(),
                          artefact_path=str(self.settings.predictor_path), model=_trained(configured).get("model"))
        choice = self.registered(model, key) or self.shipped(model, key)
        if choice is not None:
            return choice
        return Choice(self._fallback(model, RequestKey(key.method, key.allocator, key.tolerance)), None)

    def for_request(self, config: CalibrationConfig, p: CalibrationParams) -> RatioPredictor:
        """The predictor of a request (``select``); a configured or shipped one is recorded in the ``predictors``
        table the first time it serves."""
        choice = self.select(p.model, config)
        if choice.source in ("configured", "shipped"):
            self._record(choice)
        return choice.predictor

    def _record(self, choice: Choice) -> None:
        pred = choice.predictor
        if pred.version in self._recorded:
            return
        try:  # the predictors table records every predictor this deployment served with
            with self.db.session() as s:
                repo.register_predictor(s, version=pred.version, metrics=pred.metrics or {},
                                        artefact_path=choice.artefact_path, kind=pred.kind, source=choice.source,
                                        model=choice.model, training_config=_trained(pred))
            self._recorded.add(pred.version)
        except Exception:  # noqa: BLE001 - bookkeeping only
            log.warning("could not record predictor %s", pred.version, exc_info=True)

    # ------------------------------------------------------------------------------------------------ API
    def register(self, document: Any, model: str | None = None) -> tuple[PredictorInfo, bool]:
        """Register a predictor from its JSON object (``POST /predictors``): validated (422 with the reason), stored
        with its JSON in the ``predictors`` table, served from then on (newest first, when it fits a request).
        ``model`` binds it to one model (default: its training configuration's ``model``, else any model).
        Returns (its description, whether it was new)."""
        from kvcalib.service.runtime import check_model_name

        pred = parse_predictor(document)
        trained = _trained(pred)
        bound = model if model is not None else trained.get("model")
        if bound is not None:
            if not isinstance(bound, str):
                raise ServiceInputError("predictor `training.config.model` must be a model name")
            check_model_name(bound)
            if trained.get("model") not in (None, bound):
                raise ServiceInputError(f"predictor was trained for model {trained['model']!r}, not {bound!r}")
        data = json.dumps(pred.to_json(), allow_nan=False, separators=(",", ":")).encode("utf-8")
        with self.db.session() as s:
            row, created = repo.add_predictor(s, version=pred.version, metrics=pred.metrics or {},
                                              artefact_path=None, kind=pred.kind, artefact=data,
                                              source="registered", model=bound, training_config=trained)
        return self._row_info(row, set(self.defaults().values())), created

    def _row_info(self, row: PredictorRow, defaults: set[str], name: str | None = None) -> PredictorInfo:
        source: PredictorSource = "shipped" if row.source == repo.SHIPPED_SOURCE else "registered"
        return PredictorInfo(name=name, version=row.version, kind=row.kind, model=row.model, source=source,
                             training_config=dict(row.training_config or {}), metrics=dict(row.metrics or {}),
                             default=row.version in defaults, created_at=row.created_at)

    def defaults(self) -> dict[str, str]:
        """Model → the version of the predictor that serves it at the settings' default method, allocator and τ."""
        from kvcalib.calib.lm.registry import available_models

        s = self.settings
        key = RequestKey(s.default_method, s.default_allocator, s.default_tolerance)
        out = {}
        for model in available_models():
            try:
                out[model] = self.select(model, key).predictor.version
            except KvcalibError:  # a broken configured predictor: the listing still answers
                log.warning("no predictor choice for %s", model, exc_info=True)
        return out

    def listing(self) -> PredictorListing:
        """Every predictor this service knows (``GET /predictors``): the configured one, the stored ones and the
        shipped ones, each with its source and whether it is the default of its model."""
        from kvcalib.calib.predictors import bundled

        defaults = self.defaults()
        served = set(defaults.values())
        out: dict[str, PredictorInfo] = {}
        try:
            configured = self.configured()
        except KvcalibError:
            log.warning("the configured predictor cannot be loaded", exc_info=True)
            configured = None
        if configured is not None:
            trained = _trained(configured)
            out[configured.version] = PredictorInfo(
                name=self._configured_name(), version=configured.version, kind=configured.kind,
                model=trained.get("model"), source="configured", training_config=trained,
                metrics=dict(configured.metrics or {}), default=configured.version in served)
        with self.db.session() as s:
            rows = {row.version: row for row in repo.list_predictors(s)}
        shipped: list[PredictorInfo] = []
        for model, folder in ((m, f) for m in bundled.shipped_models() for f in bundled.shipped_folders(m)):
            try:
                manifest = bundled.folder_manifest(folder)
                entries = [(name, bundled.folder_predictor(folder, name)) for name in manifest.get("predictors", {})]
            except Exception:  # noqa: BLE001 - a broken package file: listed as missing, logged
                log.warning("the predictors shipped for %s in %s cannot be loaded", model, folder, exc_info=True)
                continue
            for name, pred in entries:
                row = rows.get(pred.version)
                shipped.append(PredictorInfo(
                    name=name, version=pred.version, kind=pred.kind, model=model, source="shipped",
                    training_config=_trained(pred), metrics=dict(pred.metrics or {}),
                    default=defaults.get(model) == pred.version,
                    created_at=row.created_at if row is not None else None))
        shipped_versions = {i.version for i in shipped}
        for version, row in rows.items():
            if version in out:  # the configured predictor, recorded when it served
                out[version] = dataclasses.replace(out[version], created_at=row.created_at)
            elif version not in shipped_versions and row.source != repo.SHIPPED_SOURCE:
                out[version] = self._row_info(row, served)
        return PredictorListing(predictors=list(out.values()) + shipped, defaults=defaults)

    # ------------------------------------------------------------------------------------------------ predictions
    def store(self, *, content_hash: str, model: str, model_revision: str, config: CalibrationConfig, ratio: float,
              token_budget: int, context_tokens: int, predictor: RatioPredictor, predictor_version: str | None,
              features: dict[str, Any] | None, ids_hash: str | None = None, dtype: str | None = None) -> bool:
        """Store a predicted budget (once per document hash, model, parameters — the dtype among them — and
        predictor version), with the hash of the context token ids it was predicted from."""
        from kvcalib.service.inputs import params_hash

        with self.db.session() as s:
            return repo.save_prediction(
                s, content_hash=content_hash, model=model, model_revision=model_revision, method=config.method,
                allocator=config.allocator, tolerance=config.tolerance, params_hash=params_hash(config, dtype),
                ratio=ratio, token_budget=token_budget, context_tokens=context_tokens,
                predictor_version=predictor_version or predictor.version, predictor_kind=predictor.kind,
                features=features, ids_hash=ids_hash, dtype=dtype)

    def predictions(self, *, document_hash: str | None = None, model: str | None = None, method: str | None = None,
                    allocator: str | None = None, limit: int = 100) -> list[PredictionView]:
        """Stored predictions, newest first (``GET /predictions``)."""
        with self.db.session() as s:
            return [PredictionView.of(p) for p in repo.list_predictions(
                s, content_hash=document_hash, model=model, method=method, allocator=allocator, limit=limit)]


class user_params_errors:
    """Computations run with caller-chosen method parameters: their failures are input errors (422), not 500s."""

    def __init__(self, p: CalibrationParams):
        self.custom = p.custom_method_params

    def __enter__(self) -> user_params_errors:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc is None or isinstance(exc, KvcalibError) or not self.custom:
            return False
        if isinstance(exc, (ValueError, TypeError, ZeroDivisionError, RuntimeError, IndexError)):
            raise ServiceInputError(f"calibration failed with the given method_params: {type(exc).__name__}: "
                                    f"{exc}") from exc
        return False


def row_predictor(row: PredictorRow) -> RatioPredictor:
    """The predictor a ``predictors`` row stores: its JSON (``artefact``, registered through the API) or its file or
    folder (``artefact_path``). Raises when it cannot be loaded, or when the artefact now holds another version (the
    folder was fitted again since)."""
    if row.artefact is not None:
        pred = parse_predictor(json.loads(row.artefact.decode("utf-8")))
    elif row.artefact_path:
        from kvcalib.calib.predictors import load_predictor

        pred = load_predictor(row.artefact_path)
    else:
        raise ValueError("no artefact stored")
    if pred.version != row.version:
        raise ValueError(f"its artefact now holds predictor {pred.version}")
    return pred


def controller_for(db: Database, model: str, config: CalibrationConfig) -> Choice | None:
    """The risk controller over r* that a ``mode=full`` calibration of ``model`` with ``config`` applies
    (``calibrate(..., controller=…)``: the profile serves ⌊r* − λ̂⌋_grid, expected answer loss ≤ ε): the newest
    registered one bound to ``model`` or to none that was fitted for the calibration's fidelity, τ, method and
    allocator (``calibrate.check_controller``), else the one shipped for ``model`` (``full_<fidelity>``), else None
    (the profile serves r* itself)."""
    from kvcalib.calib.calibration.calibrate import CalibrationError, check_controller
    from kvcalib.calib.predictors import bundled

    with db.session() as s:
        for row in repo.predictor_candidates(s, model=model):
            if not is_controller(row.training_config or {}):
                continue
            try:
                pred = row_predictor(row)
                check_controller(pred, config)
            except CalibrationError:
                continue
            except Exception:  # noqa: BLE001 - a stale row must not fail a calibration
                log.warning("stored predictor %s cannot be loaded; skipped", row.version, exc_info=True)
                continue
            return Choice(pred, "registered", artefact_path=row.artefact_path, model=row.model)
    try:
        pred = bundled.full_controller(model, config)
    except Exception:  # noqa: BLE001 - a broken package file: serve r*, say why in the log
        log.warning("the controller shipped for %s cannot be loaded", model, exc_info=True)
        return None
    if pred is None:
        return None
    folder = bundled.shipped_folder(model, config.method, config.allocator)
    return Choice(pred, "shipped", name=f"full_{config.fidelity}", artefact_path=str(folder) if folder else None,
                  model=model)
