"""Plain DB-API helpers so the DataLab readers (aggregate, export, api) run on SQLite and PostgreSQL.

Why not SQLAlchemy: the readers issue a handful of portable statements; the only
differences between ``sqlite3`` and ``psycopg`` that matter to them are the
parameter marker (``?`` against ``%s``), how a transaction is opened, and that
``samples.vals`` arrives as JSON text from SQLite but already decoded (jsonb)
from PostgreSQL. Those three are handled here and nowhere else.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from receiver.store_factory import is_postgres_url, sqlite_path

PG_SCHEMA = "datalab"  # the schema PostgresStore creates its tables in


def connect(store: str | Path, *, readonly: bool = False, schema: str = PG_SCHEMA, timeouts: Any = None) -> Any:
    """A DB-API connection to the store named like the receiver's ``store`` setting.

    PostgreSQL: bounded by ``timeouts`` (receiver/pg_timeouts.py ``PgTimeouts``); by default
    a reader's (exports and the API read more than ingest writes: 5 minutes a statement).
    """
    if is_postgres_url(store):
        from receiver.pg_timeouts import PgTimeouts, connect as pg_connect  # psycopg only when needed

        conn = pg_connect(str(store), timeouts or PgTimeouts(statement_s=300.0), autocommit=True)
        conn.execute(f'SET search_path TO "{schema}", public')
        if readonly:
            conn.execute("SET default_transaction_read_only = on")
        return conn
    path = sqlite_path(store)
    if readonly:
        if not path.exists():
            raise FileNotFoundError(f"no store at {path}")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


def is_sqlite(conn: Any) -> bool:
    return isinstance(conn, sqlite3.Connection)


def q(conn: Any, sql: str) -> str:
    """Write statements with ``?`` markers; psycopg wants ``%s`` (and ``%`` doubled)."""
    if is_sqlite(conn):
        return sql
    return sql.replace("%", "%%").replace("?", "%s")


def execute(conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
    cur = conn.cursor()
    cur.execute(q(conn, sql), tuple(params))
    return cur


def executemany(conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    cur = conn.cursor()
    cur.executemany(q(conn, sql), rows)


def fetchall(conn: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in execute(conn, sql, params).fetchall()]


@contextmanager
def transaction(conn: Any) -> Iterator[None]:
    """One transaction on either driver (both connections are in autocommit mode)."""
    if is_sqlite(conn):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    else:
        with conn.transaction():
            yield


def table_exists(conn: Any, name: str) -> bool:
    if is_sqlite(conn):
        sql = "SELECT 1 FROM sqlite_master WHERE type IN ('table', 'view') AND name = ?"
    else:
        sql = "SELECT 1 FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?"
    return bool(fetchall(conn, sql, (name,)))


def decode_json(value: Any) -> Any:
    """``vals``/``status`` columns: JSON text on SQLite, already a dict from jsonb."""
    if value is None or isinstance(value, (dict, list)):
        return value
    return json.loads(value)
