"""Predictor choice of the service: the configured trained predictor (``predictor_path``, else the newest one
registered in the database) when it was trained for the request's (method, allocator, τ), else the documented
fallback — the median stored r* of this deployment, else Compactor's parametric curve with neutral parameters."""

from __future__ import annotations

import logging
import statistics
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from kvcalib.calib.errors import KvcalibError
from kvcalib.service import repository as repo
from kvcalib.service.db import Database
from kvcalib.service.errors import ServiceInputError
from kvcalib.service.inputs import CalibrationParams

if TYPE_CHECKING:
    import numpy as np

    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.settings import Settings

log = logging.getLogger("kvcalib.service")


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


def predictor_fits(predictor: RatioPredictor, config: CalibrationConfig) -> bool:
    """A trained predictor only answers for the (method, allocator, τ) it was trained on."""
    try:
        trained = predictor.training_config() or {}
    except Exception:  # noqa: BLE001
        return True
    return all(trained[k] == getattr(config, k) for k in ("method", "allocator", "tolerance") if k in trained)


class Predictors:
    """The predictors a service answers with: the configured one (loaded once, registered in the store) and the
    fallback of a request."""

    def __init__(self, db: Database, settings: Settings):
        self.db, self.settings = db, settings
        self._lock = threading.Lock()
        self._cache: dict[str, RatioPredictor] = {}

    def configured(self) -> RatioPredictor | None:
        """``predictor_path``, else the newest predictor registered in the database, else None."""
        path = self.settings.predictor_path
        if path is None:
            try:
                with self.db.session() as s:
                    row = repo.latest_predictor(s)
                    path = row.artefact_path if row is not None else None
            except Exception:  # noqa: BLE001
                path = None
        if path is None:
            return None
        key = str(path)
        with self._lock:
            if key not in self._cache:
                from kvcalib.calib.predictors import load_predictor

                pred: RatioPredictor = load_predictor(path)
                try:  # the predictors table records every predictor this deployment served with
                    with self.db.session() as s:
                        repo.register_predictor(s, version=pred.version, metrics=pred.metrics or {},
                                                artefact_path=key, kind=pred.kind)
                except Exception:  # noqa: BLE001 - bookkeeping only
                    log.warning("could not register predictor %s", key, exc_info=True)
                self._cache[key] = pred
            return self._cache[key]

    def fallback(self, p: CalibrationParams) -> FallbackPredictor:
        """No (fitting) trained predictor: the median r* of the stored profiles of the same model, method,
        allocator and τ (an empirical prior of this deployment), else Compactor's parametric curve with neutral
        parameters (b = 0: fidelity = retention, hence r = 1 − τ)."""
        with self.db.session() as s:
            values = repo.stored_r_stars(s, model_name=p.model, method=p.method, allocator=p.allocator,
                                         tolerance=p.tolerance)
        return FallbackPredictor(values, p.tolerance)

    def for_request(self, config: CalibrationConfig, p: CalibrationParams) -> RatioPredictor:
        predictor = self.configured()
        if predictor is None or not predictor_fits(predictor, config):
            return self.fallback(p)
        return predictor


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
