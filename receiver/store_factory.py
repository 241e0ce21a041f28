"""Pick the DataLab store backend from one string, as the receiver's ``store`` setting.

* ``datalab.sqlite``, ``/var/lib/datalab/store.sqlite``  -> SQLite at that path
* ``sqlite:///relative.sqlite``, ``sqlite:////abs/path``  -> SQLite (SQLAlchemy's spelling)
* ``postgresql://user@host/db``, ``postgres://...``      -> PostgreSQL (libpq URL, passed as is)
* ``host=db dbname=datalab user=datalab``                 -> PostgreSQL (libpq key=value conninfo)

PostgreSQL's driver (psycopg) is imported only when a PostgreSQL URL is given,
so a van-side or SQLite-only install does not need it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from receiver.store import SQLiteStore, Store

_PG_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_SCHEME = "sqlite:///"


# libpq's key=value conninfo (``host=db password=...``): taken for a file name, it was echoed
# whole, password and all, in "no store at ..." (v17 finding 5). Its first word names a libpq
# parameter; a SQLite path does not look like that.
_CONNINFO = re.compile(r"\s*(host|hostaddr|port|dbname|user|password|passfile|service|sslmode|"
                       r"sslpassword|sslcert|sslkey|sslrootcert|application_name|options|connect_timeout|"
                       r"target_session_attrs|channel_binding|gssencmode|requiressl)\s*=", re.IGNORECASE)


def is_postgres_url(url_or_path: str | Path) -> bool:
    """A PostgreSQL URL or a libpq key=value conninfo string."""
    return isinstance(url_or_path, str) and (url_or_path.lower().startswith(_PG_SCHEMES)
                                             or _CONNINFO.match(url_or_path) is not None)


def sqlite_path(url_or_path: str | Path) -> Path:
    """The file a SQLite store setting names (``sqlite:///a`` is relative, ``sqlite:////a`` absolute)."""
    s = str(url_or_path)
    if s.lower().startswith(_SQLITE_SCHEME):
        s = s[len(_SQLITE_SCHEME) :]
    elif "://" in s:
        raise ValueError(f"unknown store URL scheme in {s!r}: use a path, sqlite:/// or postgresql://")
    if not s:
        raise ValueError("empty SQLite store path")
    return Path(s)


def open_store(url_or_path: str | Path, **kw: Any) -> Store:
    """A ready store for ``url_or_path``; ``kw`` go to the backend (``max_gap_s`` ...);
    ``pg_timeouts`` (receiver/pg_timeouts.py) to PostgreSQL only."""
    timeouts = kw.pop("pg_timeouts", None)
    if is_postgres_url(url_or_path):
        from receiver.store_pg import PostgresStore  # psycopg only when needed

        return PostgresStore(str(url_or_path), timeouts=timeouts, **kw)
    return SQLiteStore(sqlite_path(url_or_path), **kw)
