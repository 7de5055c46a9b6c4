"""Optuna storage: ``RDBStorage`` on the service database, with trial heartbeats and retries of stale trials."""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

from kvcalib.sweep.errors import SweepError

_STORAGES: dict[tuple, Any] = {}
_STORAGE_LOCK = threading.Lock()


def heartbeat_settings(settings=None) -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: ``Settings.sweep_heartbeat`` (KVCALIB_SWEEP_HEARTBEAT, 10) and
    ``Settings.sweep_grace`` (KVCALIB_SWEEP_GRACE, default max(60, 3 × interval))."""
    if settings is None:
        from kvcalib.settings import get_settings

        settings = get_settings()
    interval = int(settings.sweep_heartbeat)
    grace = int(settings.sweep_grace) if settings.sweep_grace is not None else max(60, 3 * interval)
    if interval < 1 or grace <= interval:
        raise SweepError(f"need KVCALIB_SWEEP_HEARTBEAT >= 1 and KVCALIB_SWEEP_GRACE > it, got {interval}/{grace}")
    return interval, grace


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*RetryFailedTrialCallback.*")


def storage_url(url: str | None = None) -> str:
    if url:
        return url
    from kvcalib.settings import get_settings

    return get_settings().db_url


def make_storage(url: str | None = None, heartbeat: bool = True, settings=None):
    """Optuna's ``RDBStorage`` on the service database (cached per process, URL and heartbeat setting).

    Optuna creates and versions its own tables (``studies``, ``trials``, …, its ``alembic_version``); the project's
    Alembic migrations use ``kvcalib_alembic_version`` and ignore those tables (``migrations/env.py``)."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    _quiet_optuna()
    url = storage_url(url or (settings.db_url if settings is not None else None))
    hb = heartbeat_settings(settings) if heartbeat else (None, None)
    key = (url, hb, os.getpid())
    with _STORAGE_LOCK:
        st = _STORAGES.get(key)
        if st is not None:
            return st
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            from sqlalchemy.engine import make_url

            db = make_url(url).database
            if db and db != ":memory:":
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 60}
        try:
            if heartbeat:
                st = RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=hb[0], grace_period=hb[1],
                                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=None))
            else:
                st = RDBStorage(url, engine_kwargs=kwargs)
        except Exception as exc:  # unreachable database, bad URL
            raise SweepError(f"cannot open the sweep storage: {type(exc).__name__}: {exc}") from exc
        _STORAGES[key] = st
        return st


def reset_storages() -> None:
    """Forget cached storages (after fork: a child must not share its parent's connection pool)."""
    with _STORAGE_LOCK:
        _STORAGES.clear()
