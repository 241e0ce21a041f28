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

import re
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


# ``password=``, ``sslpassword=`` or any other ``...password`` parameter of a libpq conninfo,
# its value bare or single-quoted (libpq's quoting, backslash escapes).
_CONNINFO_SECRET = re.compile(r"(\b\w*password\s*=\s*)('(?:[^'\\]|\\.)*'|\S*)", re.IGNORECASE)


def _is_secret_key(key: str) -> bool:
    return "password" in key.lower()


def safe_url(store: str) -> str:
    """``store`` fit to print: a URL's password (in the user part or any ``...password=`` parameter,
    ``sslpassword`` too) and a conninfo's password values as ``***``."""
    if "://" not in store:
        return _CONNINFO_SECRET.sub(lambda m: m.group(1) + "***", store)
    parts = urlsplit(store)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = urlencode([(k, "***" if _is_secret_key(k) else v) for k, v in parse_qsl(parts.query,
                                                                                    keep_blank_values=True)],
                      safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secrets_of(store: str) -> list[str]:
    if "://" not in store:
        return [m.group(2).strip("'") for m in _CONNINFO_SECRET.finditer(store) if m.group(2).strip("'")]
    parts = urlsplit(store)
    found = [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query) if _is_secret_key(k) and v]
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
    if not path.is_file():  # a FIFO or device: opening it to read the header would block or mislead
        raise StoreNotFound(f"{where}: not a regular file")
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise StoreNotFound(f"{where}: cannot read it ({exc.strerror or exc})") from exc
    if head != SQLITE_MAGIC:
        raise StoreNotFound(f"{where}: the file is not a SQLite database")
    try:
        # mode=ro: never creates the file, never writes; a WAL store opens fine read-only
        # With no -wal file beside it the main file holds everything: read it as immutable, or a
        # WAL-mode file would get -wal and -shm files made beside it by a mere check.
        wal = path.with_name(path.name + "-wal").exists()
        conn = sqlite3.connect(f"file:{path}?mode=ro" + ("" if wal else "&immutable=1"), uri=True)
        try:
            found = _is_datalab_sqlite(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreNotFound(f"{where}: SQLite cannot read it ({exc})") from exc
    if not found:
        raise StoreNotFound(f"{where}: a SQLite database but not a DataLab store (not the store's own"
                            f" {', '.join(STORE_TABLES)} tables)")


#: The store's own tables, the samples with their key columns: what every DataLab store has from
#: its first open (receiver/store.py), whatever its schema version (PRAGMA user_version, 0 before
#: version 2, and other programs set user_version too, so it alone proves nothing).
STORE_TABLES = ("batches", "samples", "fixes", "positions")
SAMPLE_COLUMNS = {"device", "epoch", "seq", "sensor", "t_utc_ms", "batch_id"}


def _is_datalab_sqlite(conn: sqlite3.Connection) -> bool:
    """The store's own marker, not merely a table named ``samples``: any such file was adopted and
    written into before (v17 finding 6)."""
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not set(STORE_TABLES) <= names:
        return False
    return SAMPLE_COLUMNS <= {r[1] for r in conn.execute(f"PRAGMA table_info({MARK_TABLE})")}


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
