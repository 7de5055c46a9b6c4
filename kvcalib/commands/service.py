"""Service commands: ``serve`` (API), ``worker`` (Celery), ``db upgrade|current``, ``batch CORPUS``.

Configuration comes from ``kvcalib.settings`` (environment ``KVCALIB_*``); with nothing configured ``serve`` runs the
embedded deployment: a SQLite file in the data directory (created/upgraded at start) and jobs executed in-process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from kvcalib.commands.common import console, emit_json, fail, friendly_errors

db_app = typer.Typer(no_args_is_help=True, help="Profile-store database (Alembic migrations).")


def _unavailable_is_error(fn):
    """A down broker/database is an operational error: one line and exit 3, never a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kvcalib.service.errors import UnavailableError

        try:
            return fn(*args, **kwargs)
        except UnavailableError as exc:
            fail(str(exc), code=3, kind=type(exc).__name__)

    return wrapper


def _settings(**overrides):
    from kvcalib.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _redact(url: str) -> str:
    from kvcalib.service.db import _redact as redact

    return redact(url)


@friendly_errors
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (KVCALIB_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (KVCALIB_PORT).")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (KVCALIB_DATABASE_URL).")] = None,
    broker_url: Annotated[str | None, typer.Option(help="Celery broker (KVCALIB_BROKER_URL); none = "
                                                           "in-process jobs.")] = None,
    log_level: Annotated[str | None, typer.Option(help="uvicorn log level.")] = None,
):
    """Run the HTTP API (uvicorn). Nothing configured = SQLite + in-process execution (the embedded default)."""
    import uvicorn

    from kvcalib.api.app import create_app

    s = _settings(host=host, port=port, database_url=database_url, broker_url=broker_url, log_level=log_level)
    mode = "in-process jobs" if s.embedded else f"Celery broker {_redact(s.broker_url)}"
    console.print(f"[dim]kvcalib serve: database {_redact(s.db_url)}"
                  f"{' (auto-upgraded)' if s.migrate_on_start else ''}, {mode}[/]")
    if s.torch_threads:
        import torch

        torch.set_num_threads(s.torch_threads)
    app = create_app(s)  # raises SchemaError (exit 2 with the fix) when the schema is not at head
    uvicorn.run(app, host=s.host, port=s.port, log_level=s.log_level)


@friendly_errors
def worker(
    queues: Annotated[str | None, typer.Option(help="Comma-separated queues (default: KVCALIB_QUEUE, or the GPU "
                                                       "queue with --gpu).")] = None,
    gpu: Annotated[bool, typer.Option(help="Consume the GPU queue and load the model on CUDA.")] = False,
    pool: Annotated[str, typer.Option(help="Celery pool: solo, prefork or threads.")] = "solo",
    concurrency: Annotated[int, typer.Option(help="Worker processes/threads (1 per model copy).")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
):
    """Run a Celery worker for the configured broker (KVCALIB_BROKER_URL)."""
    from kvcalib.settings import get_settings

    if gpu:
        os.environ["KVCALIB_WORKER_DEVICE"] = os.environ.get("KVCALIB_WORKER_DEVICE", "cuda")
        get_settings.cache_clear()
    s = get_settings()
    if not s.broker_url:
        fail("KVCALIB_BROKER_URL is not set: without a broker `kvcalib serve` runs jobs in-process and needs no "
             "worker")
    from kvcalib.service.db import prepare

    prepare(s.db_url, s.migrate_on_start)  # refuse to start on an old schema, with the fix in the message
    from kvcalib.worker.app import app as celery_app

    q = queues or (s.gpu_queue if gpu else s.queue)
    argv = ["worker", f"--pool={pool}", f"--concurrency={concurrency}", f"--queues={q}", f"--loglevel={loglevel}",
            "--without-gossip", "--without-mingle"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv=argv)


@db_app.command("upgrade")
@friendly_errors
def db_upgrade(
    database_url: Annotated[str | None, typer.Option(help="Default: KVCALIB_DATABASE_URL / embedded SQLite.")]
    = None,
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
):
    """Apply the Alembic migrations (`alembic upgrade head`)."""
    from kvcalib.service.db import upgrade

    s = _settings(database_url=database_url)
    rev = upgrade(s.db_url, revision)
    console.print(f"database {_redact(s.db_url)} is at revision {rev}")


@db_app.command("current")
@friendly_errors
def db_current(
    database_url: Annotated[str | None, typer.Option(help="Default: KVCALIB_DATABASE_URL.")] = None,
):
    """Print the schema revision of the database and the head revision."""
    from kvcalib.service.db import Database, current_revision, head_revision

    s = _settings(database_url=database_url)
    db = Database(s.db_url)
    try:
        cur = current_revision(db.engine)
    finally:
        db.dispose()
    emit_json({"database": _redact(s.db_url), "current": cur, "head": head_revision(), "at_head":
               cur == head_revision()})


# ---------------------------------------------------------------------------------------------------- batch
def read_corpus(path: Path) -> list[dict]:
    """A folder of .txt files (one document each, source = file name) or a JSONL file."""
    from kvcalib.service import decode_utf8, parse_jsonl

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            fail(f"no .txt/.md files in {str(path)!r}")
        return [{"text": decode_utf8(p.read_bytes(), str(p)), "source": p.name} for p in files]
    if not path.is_file():
        fail(f"corpus {str(path)!r} does not exist")
    docs = parse_jsonl(decode_utf8(path.read_bytes(), str(path)), 10**9)
    return [{k: v for k, v in d.__dict__.items() if v is not None} for d in docs]


@friendly_errors
@_unavailable_is_error
def batch(
    corpus: Annotated[Path, typer.Argument(help="Folder of .txt files, or a JSONL file ({\"text\": …} per line).")],
    api: Annotated[str | None, typer.Option(help="Submit to this API (e.g. http://127.0.0.1:8000); default: "
                                                    "directly to the configured database/broker.")] = None,
    token: Annotated[str | None, typer.Option(envvar="KVCALIB_API_TOKEN", help="Bearer token of the API.")]
    = None,
    model: Annotated[str | None, typer.Option(help="Registry model.")] = None,
    method: Annotated[str | None, typer.Option(help="Scoring method.")] = None,
    allocator: Annotated[str | None, typer.Option(help="Budget allocator.")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Fidelity tolerance τ.")] = None,
    ratios: Annotated[str | None, typer.Option(help="Comma-separated ratio grid, e.g. 0.3,0.5,0.7.")] = None,
    n_probes: Annotated[int | None, typer.Option(help="Probes per document.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Model dtype: fp32, bf16 or fp16 (default: "
                                                   "KVCALIB_WORKER_DTYPE).")] = None,
    device: Annotated[str | None, typer.Option(help="Device the jobs run on: cpu, cuda or cuda:N (default: "
                                                    "KVCALIB_WORKER_DEVICE; one of KVCALIB_ALLOWED_DEVICES).")]
    = None,
    wait: Annotated[bool, typer.Option(help="Show progress until the batch is done.")] = True,
    poll: Annotated[float, typer.Option(help="Seconds between progress polls.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final batch as JSON.")] = False,
):
    """Calibrate a corpus as one batch and show its progress until done."""
    docs = read_corpus(corpus)
    options = {}
    if ratios:
        try:
            options["ratios"] = [float(x) for x in ratios.split(",") if x.strip()]
        except ValueError:
            fail(f"--ratios must be comma-separated numbers, got {ratios!r}")
    if n_probes is not None:
        options["n_probes"] = n_probes
    params = {"model": model, "method": method, "allocator": allocator, "tolerance": tolerance,
              "options": options or None, "dtype": dtype, "device": device}
    if api:
        final = _batch_via_api(api, token, docs, params, wait, poll, as_json)
    else:
        final = _batch_direct(docs, params, wait, poll, as_json)
    if as_json:
        emit_json(final)
    else:
        c = final["counts"]
        console.print(f"batch {final['id']}: {c['succeeded']} succeeded, {c['failed']} failed, "
                      f"{c['queued'] + c['running']} pending of {final['total']}")
    if final.get("done") and final["counts"]["failed"]:
        raise typer.Exit(1)


def _progress_loop(fetch, total: int, poll: float, quiet: bool) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]batch[/] {task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                  TimeElapsedColumn(), console=console, disable=quiet) as bar:
        task = bar.add_task("", total=total)
        while True:
            b = fetch()
            c = b["counts"]
            bar.update(task, completed=b["progress"] * total,
                       description=f"{b['id']}: {c['succeeded']} ok, {c['failed']} failed, {c['running']} running")
            if b["done"]:
                return b
            time.sleep(poll)


def _batch_via_api(api, token, docs, params, wait, poll, quiet) -> dict:
    from kvcalib.client import KvcalibClient, ServiceError

    with KvcalibClient(api, token=token, timeout=60) as kv:
        try:
            b = kv.submit_batch(docs, **{k: v for k, v in params.items() if v is not None})
            if not wait:
                return b
            return _progress_loop(lambda: kv.batch(b["id"]), b["total"], poll, quiet)
        except ServiceError as exc:
            fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - connection refused, timeouts
            fail(f"cannot reach the API at {api}: {exc}")


def _batch_direct(docs, params, wait, poll, quiet) -> dict:
    from dataclasses import asdict

    from kvcalib.service import DocumentInput, Service
    from kvcalib.service.db import prepare
    from kvcalib.settings import get_settings

    s = get_settings()
    db = prepare(s.db_url, s.migrate_on_start)
    if s.embedded:
        from kvcalib.service.jobs import InProcessDispatcher
        from kvcalib.service.runtime import get_engine

        dispatcher = InProcessDispatcher(db, lambda name, dtype=None, device=None:
                                         get_engine(name, device or s.worker_device, dtype),
                                         s.inprocess_workers,
                                         s.job_max_retries + 1, s.job_retry_backoff)
        if not wait:
            fail("without a broker the batch runs in this process: --no-wait needs KVCALIB_BROKER_URL")
    else:
        from kvcalib.worker.dispatch import CeleryDispatcher

        dispatcher = CeleryDispatcher(s)
    service = Service(db, s, dispatcher)
    try:
        p = service.params(params["model"], params["method"], params["allocator"], params["tolerance"],
                           params["options"], params["dtype"], params["device"])
        b = asdict(service.submit_batch([DocumentInput(**d) for d in docs], p))
        if not wait:
            return json.loads(json.dumps({k: v for k, v in b.items() if k != "items"}, default=str))
        final = _progress_loop(lambda: asdict(service.batch(b["id"], items=False)), b["total"], poll, quiet)
        return json.loads(json.dumps(final, default=str))
    finally:
        dispatcher.close(wait=False)
        db.dispose()


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.command("batch")(batch)
    app.add_typer(db_app, name="db")
