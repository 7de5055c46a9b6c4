"""Alembic environment of the kvcalib profile store.

The URL comes from the caller (``kvcalib db upgrade`` / tests pass it in the config) or else from the same
``kvcalib.settings.Settings`` the app and workers read (``KVCALIB_DATABASE_URL``, default the embedded SQLite file).
Only kvcalib's own tables are managed: Optuna's tables living in the same database are ignored by autogenerate, and
the version table is ``kvcalib_alembic_version`` because Optuna's storage uses ``alembic_version`` itself.
"""

from __future__ import annotations

from alembic import context

from kvcalib.service.db import VERSION_TABLE, make_engine
from kvcalib.service.orm import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("kvcalib_url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from kvcalib.settings import Settings

    return Settings().db_url


def include_name(name, type_, parent_names):
    if type_ == "table":
        return name in target_metadata.tables
    return True


def _configure(**kw):
    context.configure(target_metadata=target_metadata, version_table=VERSION_TABLE, include_name=include_name,
                      compare_type=True, **kw)


def run_migrations_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"},
               render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = _url()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
