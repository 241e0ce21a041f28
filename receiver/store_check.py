"""Open an existing store or say clearly why not: read commands never create one (issue 17.3).

``datalab-receiver stats``, ``aggregate``, ``export``, ``serve`` and ``derive`` used to
open the store the way the ingest worker does, which creates the file (and its
folders) when it is missing: a mistyped ``--store`` gave an empty store, counts of
0 and exit 0, or a traceback after the file was made. Here a store is checked
without touching the disk (SQLite: stat, the header, a read-only open; PostgreSQL:
one bounded connection) and a missing one is ``StoreNotFound`` with one line that
names it. A PostgreSQL URL is named with its password hidden: secrets never reach
logs or terminals.

Only ``datalab-receiver run`` (the ingest worker) and ``datalab-receiver init`` create a store.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import click

from core.errors import StoreNotFound, StoreUnreachable
from receiver.store_factory import is_postgres_url, sqlite_path

SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
MARK_TABLE = "samples"  # every DataLab store has it from its first open (receiver/store.py)
PG_SCHEMA = "datalab"  # as receiver/dbapi.py PG_SCHEMA (not imported: dbapi imports us)
CREATE_HINT = "create one with `datalab-receiver init --store ...` or let `datalab-receiver run` make it"


def safe_url(store: str) -> str:
    """``store`` fit to print: a URL's password (in the user part or a ``password=`` parameter) as ``***``."""
    if "://" not in store:
        return store
    parts = urlsplit(store)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query,
                                                                                         keep_blank_values=True)],
                      safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets_of(store: str) -> list[str]:
    parts = urlsplit(store)
    found = [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    return found


def check_sqlite(path: Path) -> None:
    """Raise ``StoreNotFound`` unless ``path`` is a SQLite file holding a DataLab store; creates nothing."""
    where = f"no store at {path}"
    if not path.parent.is_dir():
        raise StoreNotFound(f"{where}: the folder {path.parent} does not exist; {CREATE_HINT}")
    if path.is_dir():
        raise StoreNotFound(f"{where}: that is a folder, not a store file")
    if not path.exists():
        raise StoreNotFound(f"{where}: no such file; {CREATE_HINT}")
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise StoreNotFound(f"{where}: cannot read it ({exc.strerror or exc})") from exc
    if head != SQLITE_MAGIC:
        raise StoreNotFound(f"{where}: the file is not a SQLite database")
    try:
        # mode=ro: never creates the file, never writes; a WAL store opens fine read-only
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (MARK_TABLE,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreNotFound(f"{where}: SQLite cannot read it ({exc})") from exc
    if not found:
        raise StoreNotFound(f"{where}: a SQLite database but not a DataLab store (no {MARK_TABLE} table)")


def check_postgres(url: str, timeouts: Any = None) -> None:
    """Raise ``StoreNotFound`` unless ``url`` answers and holds the DataLab schema; the password is never shown."""
    import psycopg

    from receiver.pg_timeouts import PgTimeouts, connect

    shown = safe_url(url)
    try:
        with connect(url, timeouts or PgTimeouts(connect_s=5.0, statement_s=10.0), autocommit=True) as conn:
            found = conn.execute("SELECT to_regclass(%s)", (f"{PG_SCHEMA}.{MARK_TABLE}",)).fetchone()
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        for secret in _secrets_of(url):  # libpq does not echo passwords, but never rely on it
            first = first.replace(secret, "***")
        raise StoreUnreachable(f"cannot reach the store at {shown}: {first}") from exc
    if not found or found[0] is None:
        raise StoreNotFound(f"no store at {shown}: no {PG_SCHEMA}.{MARK_TABLE} table; {CREATE_HINT}")


def require_store(store: str | Path, *, timeouts: Any = None) -> None:
    """Check that ``store`` (a receiver ``store`` setting) names an existing DataLab store."""
    if is_postgres_url(store):
        check_postgres(str(store), timeouts)
        return
    try:
        path = sqlite_path(store)
    except ValueError as exc:
        raise StoreNotFound(f"no store at {safe_url(str(store))}: {exc}") from exc
    check_sqlite(path)


class NoStoreExit(click.ClickException):
    """``StoreNotFound`` at the command line: one line on stderr, exit code 2 (a usage mistake, not a crash)."""

    exit_code = 2


def require_store_or_exit(store: str | Path, *, timeouts: Any = None) -> None:
    """``require_store`` for click commands: a missing store ends the command with ``NoStoreExit``."""
    try:
        require_store(store, timeouts=timeouts)
    except StoreNotFound as exc:
        raise NoStoreExit(str(exc)) from None  # the chain is the user's typo, not a bug: no traceback
