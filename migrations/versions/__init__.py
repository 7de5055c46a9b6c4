"""Alembic revision scripts (loaded by Alembic by path; ``__init__`` is skipped by its revision scan)."""
