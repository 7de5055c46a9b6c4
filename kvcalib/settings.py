"""Service settings: ONE pydantic-settings class read from the environment (prefix ``KVCALIB_``) or a ``.env`` file.

Every service component (API, Celery worker, CLI, Alembic's ``migrations/env.py``) builds its configuration from
``get_settings()``. With nothing configured the service is *embedded*: a SQLite file in the data directory and jobs
executed in-process (a background thread pool of the API process). See ``docs/service.md`` for the table.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kvcalib.calib import defaults

DEVICE_PATTERN = r"^(cpu|cuda(:[0-9]{1,3})?)$"  # the devices a request may name: cpu, cuda, cuda:N


def _default_cache_dir() -> Path:
    from kvcalib.calib.lm.registry import default_cache_dir

    return default_cache_dir()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVCALIB_", env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore")

    # ------------------------------------------------------------------ storage
    cache_dir: Path = Field(default_factory=_default_cache_dir,
                            description="Folder of converted model weights (and, by default, of the service data).")
    data_dir: Path = Field(default_factory=lambda data: data["cache_dir"] / "service",
                           description="Folder of the embedded SQLite database and stored artefacts "
                                       "(default <cache_dir>/service).")
    essays: Path | None = Field(default=None, description="Folder of .txt essays for corpus commands and sweeps "
                                                           "(default: shared/data/essays found upward, else bundled).")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db. Default: sqlite:///<data_dir>/kvcalib.db")
    auto_migrate: bool | None = Field(
        default=None,
        description="Run `alembic upgrade head` at start-up. Default: only for SQLite databases; a server database "
                    "whose schema is not at head makes the app/worker refuse to start (run `kvcalib db upgrade`).")

    # ------------------------------------------------------------------ job execution
    broker_url: str | None = Field(
        default=None, description="Celery broker (redis://...). None = embedded: jobs run in-process.")
    result_backend: str | None = Field(default=None, description="Celery result backend. Default: the broker URL.")
    queue: str = Field(default="kvcalib", description="Celery queue of calibration jobs.")
    gpu_queue: str = Field(default="kvcalib-gpu", description="Celery queue consumed by GPU workers.")
    route_to_gpu: bool = Field(default=False, description="Route calibration jobs to the GPU queue.")
    worker_device: str = Field(default="cpu", description="Torch device of the model in workers (cpu, cuda).")
    allowed_devices: Annotated[list[str] | None, NoDecode] = Field(
        default=None, description="Devices a request may ask for (its `device`: cpu, cuda, cuda:N), comma-separated "
                                  "(or a JSON list). Default: the worker device only. With a broker, list the "
                                  "devices the workers have: the API process only checks the ones it runs on.")
    worker_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Dtype of the model weights and KV cache in the service's engines.")
    broker_visibility_timeout: int = Field(
        default=3600, ge=1, description="Seconds before an unacknowledged job (dead worker) is redelivered.")
    broker_timeout: float = Field(default=1.0, gt=0, description="Seconds to wait for the broker before a 503.")
    job_max_retries: int = Field(default=3, ge=0, description="Automatic retries of a job on transient errors.")
    job_retry_backoff: float = Field(default=2.0, ge=0, description="Base of the exponential retry backoff (s).")
    inprocess_workers: int = Field(default=1, ge=1, le=16, description="Threads running embedded jobs.")
    job_lease_seconds: float = Field(
        default=60.0, ge=1, description="Lease of a running job: renewed every third of it by the executing worker; a "
                                        "job whose lease expired (dead worker) is dispatched again by the sweeper.")
    job_dispatch_grace: float = Field(
        default=60.0, ge=0, description="Seconds a queued job may go without its broker message (lost in a broker "
                                        "restart) before the sweeper dispatches it again.")
    job_sweep_interval: float = Field(
        default=15.0, gt=0, description="Seconds between two sweeps for expired leases and lost messages (workers "
                                        "and the API process sweep at start-up and then periodically).")
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads of a worker / serve process (None = torch's default). "
                                        "1 avoids thrashing when several model processes share few cores.")

    # ------------------------------------------------------------------ sweeps (kvcalib.sweep, docs/sweeps.md)
    sweep_heartbeat: int = Field(default=10, ge=1, description="Seconds between the heartbeats of a running trial.")
    sweep_grace: int | None = Field(
        default=None, ge=2, description="Seconds without a heartbeat after which a running trial is failed and "
                                        "retried (default max(60, 3 × sweep_heartbeat); must exceed the interval).")
    sweep_capture_cache_mb: float = Field(
        default=1024.0, ge=0, description="Per-process LRU cache of the sweep's prefill captures, in MiB.")

    # ------------------------------------------------------------------ calibration defaults
    default_model: str = defaults.MODEL
    default_method: str = defaults.METHOD
    default_allocator: str = defaults.ALLOCATOR
    default_tolerance: float = Field(default=defaults.TOLERANCE, gt=0.0, le=1.0)
    predictor_path: Path | None = Field(
        default=None, description="Folder of a trained predictor (calib.predictors). None (or one trained for "
                                  "other settings) = the newest predictor registered in the database, else the one "
                                  "shipped for the request's model, else the documented fallback.")

    # ------------------------------------------------------------------ limits and security
    max_document_bytes: int = Field(default=1_000_000, ge=1, description="Larger documents get 413.")
    max_document_tokens: int = Field(
        default=8192, ge=16, description="Longer documents get 413 (also capped at the model's context length).")
    max_batch_documents: int = Field(default=1000, ge=1, description="Documents per batch request; larger "
                                                                     "batches get 413 (split them).")
    max_request_bytes: int = Field(default=64 * 2**20, ge=1024,
                                   description="Request bodies over this get 413 as soon as the limit is passed "
                                               "(declared Content-Length or bytes counted as they stream).")
    sync_concurrency: int = Field(default=4, ge=1, le=256,
                                  description="Synchronous predict/compress computations at once per API process.")
    sync_queue: int = Field(default=8, ge=0, description="Synchronous requests allowed to wait for a free slot; "
                                                         "past it (or past sync_timeout waiting) → 429 + Retry-After.")
    sync_timeout: float = Field(default=120.0, gt=0, description="Time limit (s) of one synchronous predict/compress "
                                                                 "request, waiting included; past it → 503.")
    max_pseudo_tokens: int = Field(default=32, ge=1, description="Cap of Lookahead Q-Cache's `n_pseudo` (decoded "
                                                                 "pseudo tokens per scoring).")
    store_document_text: bool = Field(
        default=True, description="False = hash-only: documents are stored by hash and size, their text only while "
                                  "one of their full calibrations is unfinished.")
    api_token: SecretStr | None = Field(
        default=None, description="If set, every write endpoint (POST, DELETE) needs `Authorization: Bearer <token>`. "
                                  "Set but blank: the API refuses to start.")
    api_read_token: SecretStr | None = Field(
        default=None, description="If set, GET endpoints of stored data (jobs, batches, profiles, budgets) need "
                                  "`Authorization: Bearer <read token>` (or the write token).")
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("database_url", "broker_url", "result_backend", mode="before")
    @classmethod
    def _empty_is_none(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("allowed_devices", mode="before")
    @classmethod
    def _split_devices(cls, v):
        if isinstance(v, str):
            v = v.strip()
            if not v:
                return None
            v = json.loads(v) if v.startswith("[") else [d.strip() for d in v.split(",") if d.strip()]
        return v

    @field_validator("allowed_devices")
    @classmethod
    def _check_devices(cls, v):
        for d in v or ():
            if re.fullmatch(DEVICE_PATTERN, d) is None:
                raise ValueError(f"unknown device {d!r}: expected cpu, cuda or cuda:N")
        return list(dict.fromkeys(v)) if v else None

    # ------------------------------------------------------------------ derived
    @property
    def devices(self) -> list[str]:
        """The devices a request may name (``allowed_devices``, default: the worker device alone)."""
        return list(self.allowed_devices) if self.allowed_devices else [self.worker_device]

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'kvcalib.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")

    @property
    def migrate_on_start(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: jobs execute in the API process."""
        return self.broker_url is None

    @property
    def backend_url(self) -> str | None:
        return self.result_backend or self.broker_url

    @property
    def calibration_queue(self) -> str:
        return self.gpu_queue if self.route_to_gpu else self.queue

    @property
    def token(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token is not None else None

    @property
    def read_token(self) -> str | None:
        return self.api_read_token.get_secret_value() if self.api_read_token is not None else None

    def check_tokens(self) -> None:
        """Refuse a token that is set but blank (it would otherwise read as "no token", i.e. no authentication)."""
        from kvcalib.calib.errors import KvcalibError

        for var, value in (("KVCALIB_API_TOKEN", self.token), ("KVCALIB_API_READ_TOKEN", self.read_token)):
            if value is not None and not value.strip():
                raise KvcalibError(f"{var} is set but blank: set a real token, or unset the variable to run "
                                   "without authentication")


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests build ``Settings(...)`` explicitly instead)."""
    return Settings()
