"""Fixtures shared by the service tests."""

from __future__ import annotations

import pytest

from kvcalib.service.db import Database, upgrade
from tests.support import clean_pg, pg_url  # noqa: F401  (fixtures, requested by name below)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.service)])
def db(request, tmp_path):
    """A migrated database, empty: a SQLite file of the test, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'service.db'}"
        upgrade(url)
    else:
        url = request.getfixturevalue("clean_pg")
    d = Database(url)
    yield d
    d.dispose()
