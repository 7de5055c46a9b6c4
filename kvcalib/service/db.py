"""Database engines and sessions, and the schema check / upgrade through Alembic (the only schema path)."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from kvcalib.calib.errors import KvcalibError

# The migrations are the package ``kvcalib.migrations`` (``migrations/`` in a checkout): a real folder in both a
# checkout and an installed wheel (setuptools installs packages unzipped), which is what Alembic needs.
MIGRATIONS_DIR = Path(str(resources.files("kvcalib.migrations")))
VERSION_TABLE = "kvcalib_alembic_version"  # not `alembic_version`: Optuna's RDB storage owns that one


class SchemaError(KvcalibError):
    """The database schema is not at the Alembic head revision (or the database cannot be reached)."""


def _sqlite_pragmas(dbapi_conn, _record):
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_engine(url: str, **kwargs) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        eng = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(eng, "connect", _sqlite_pragmas)
        return eng
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    if u.get_backend_name() == "postgresql":
        kwargs.setdefault("connect_args", {"connect_timeout": 5})
    return create_engine(url, **kwargs)


class Database:
    """An engine plus a session factory; ``session()`` is a context manager committing on success."""

    def __init__(self, url: str, engine: Engine | None = None):
        self.url = url
        self.engine = engine or make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        s = self.sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def ping(self) -> None:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


# ---------------------------------------------------------------------------------------------------- migrations
def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()  # no alembic.ini: it is a checkout's convenience for `alembic upgrade head`, absent in a wheel
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["kvcalib_url"] = url
    return cfg


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from_dir = ScriptDirectory.from_config(alembic_config("sqlite://"))
    heads = from_dir.get_heads()
    if len(heads) != 1:
        raise SchemaError(f"expected one Alembic head in {MIGRATIONS_DIR}, found {heads}")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()


_UPGRADE_LOCK = threading.Lock()


def upgrade(url: str, revision: str = "head") -> str:
    """``alembic upgrade head`` programmatically; returns the revision now current."""
    from alembic import command

    with _UPGRADE_LOCK:
        command.upgrade(alembic_config(url), revision)
    eng = make_engine(url)
    try:
        return current_revision(eng) or ""
    finally:
        eng.dispose()


def check_schema(db: Database) -> str:
    """Raise ``SchemaError`` with the fix unless the schema is at head; returns the revision."""
    try:
        cur = current_revision(db.engine)
    except Exception as exc:  # unreachable database, bad URL
        raise SchemaError(f"cannot reach the database {_redact(db.url)}: {exc}") from exc
    head = head_revision()
    if cur != head:
        raise SchemaError(
            f"database schema of {_redact(db.url)} is at revision {cur or 'none (empty database)'}, expected {head}: "
            "run `kvcalib db upgrade` (or set KVCALIB_AUTO_MIGRATE=1)")
    return cur


def prepare(url: str, migrate: bool) -> Database:
    """The start-up path of the app and the worker: upgrade when allowed, then insist on head."""
    if migrate:
        upgrade(url)
    db = Database(url)
    check_schema(db)
    return db


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"
