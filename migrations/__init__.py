"""Alembic migrations of the kvcalib profile store, shipped as ``kvcalib.migrations``.

``kvcalib.service.db`` finds this folder through ``importlib.resources`` (a checkout and an installed wheel alike);
``alembic upgrade head`` in a checkout's root finds it through ``alembic.ini``. Nothing is imported here: Alembic
runs ``env.py`` itself.
"""
