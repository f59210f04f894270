"""Storage URLs as users write them, made into the URL SQLAlchemy can open here.

SQLAlchemy 2.x opens ``postgresql://`` with psycopg 3 (``postgresql+psycopg``); 1.4 and
many guides use psycopg2 (``postgresql+psycopg2://``), and Heroku-style URLs say
``postgres://``, which SQLAlchemy refuses since 1.4. A study file should work whichever
of the two drivers is installed, so a PostgreSQL URL is run with the driver it names
when that is installed, and otherwise with the one that is (psycopg 3 first).
"""

from __future__ import annotations

import importlib.util

__all__ = ["normalize_storage_url", "POSTGRES_DRIVERS"]

# SQLAlchemy's dialect driver names and the modules they import, in order of preference
POSTGRES_DRIVERS = ("psycopg", "psycopg2")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def normalize_storage_url(url: str) -> str:
    """``url`` with a PostgreSQL driver that is installed (other URLs unchanged).

    ``postgresql://``, ``postgres://`` and ``postgresql+psycopg2://`` all give
    ``postgresql+psycopg://`` where only psycopg 3 is installed, and ``+psycopg2`` where
    only psycopg2 is; a bare ``postgresql://`` names the installed driver (SQLAlchemy
    2.0 picks psycopg2 for it, 2.1 psycopg 3). A URL whose driver is installed, or where
    neither is (the caller then says which extra to install), is returned as given.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return url  # open_storage reports the bad URL
    backend, _, driver = parsed.drivername.partition("+")
    if backend not in ("postgresql", "postgres") or (driver and driver not in POSTGRES_DRIVERS):
        return url
    if backend == "postgresql" and driver and _installed(driver):
        return url
    for candidate in POSTGRES_DRIVERS:
        if _installed(candidate):
            return parsed.set(drivername=f"postgresql+{candidate}").render_as_string(
                hide_password=False)
    return url
