"""Retention of personal data: a van's raw positions are dropped once the maps are built.

Why: a named van's positions over time are its postal worker's movements, personal
data a municipality must minimise and keep no longer than needed (docs/privacy.md).
What the DataLab publishes, the street maps (``aggregates``), holds no single van's
track: medians over several passes on several days, published only above a threshold.
The raw positions are needed until the maps that use them are built, and for a while
after (a rebuild with other parameters, a check of a strange value): ``keep_days``.

What is dropped, for times older than the cut-off:

* ``samples`` of the GPS sensor (the van's raw NMEA-derived fixes as it sent them),
* ``fixes`` and ``positions`` (every measured value's place),
* ``dead_letters`` (rejected uploads, which carry positions too) by received time.

The measured values themselves stay (without a place they are no track), and so do
the published maps. On PostgreSQL each month of ``samples`` keeps its GPS samples in a
partition of their own (receiver/pg_samples.py): a month wholly before the cut-off loses
that partition whole (detached and dropped, no row-by-row delete, no dead pages holding
positions), and the rows of a partly expired month are deleted as on SQLite.

What a build has seen is told by when a row was *stored*, not by its sample time: a van's
backlog uploaded after the newest build carries old sample times but no build has used it
(v17 finding 2). So a row goes only if it is older than the cut-off by its own time AND was
stored (``received_utc_ms`` of its sample) before the newest build ran. Rows whose sample
was stored later are kept whatever their age, until a later build has seen them.

The cut-off is ``keep_days`` before now, or before the newest map build or row stored
(whichever is later) if now is later than both: a server clock that jumped ahead (bad RTC,
NTP) then cannot make two-day-old positions look years old (v17 finding 12); with the daily
build timer this is "now". With no build at all, nothing is dropped, and the plan
says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from receiver import dbapi
from receiver.export import iso_ms

DAY_MS = 86_400_000
log = logging.getLogger(__name__)

#: (table, time column, extra condition): the personal data retention removes.
TARGETS: tuple[tuple[str, str, str], ...] = (
    ("samples", "t_utc_ms", " AND sensor = 'gps'"),
    ("fixes", "t_utc_ms", ""),
    ("positions", "t_utc_ms", ""),
    ("dead_letters", "received_utc_ms", ""),
)


@dataclass
class Plan:
    """What ``apply`` removes (or, in a dry run, would remove)."""

    keep_days: int
    cutoff_ms: int | None  # None: nothing may be dropped (see ``reason``)
    reason: str
    rows: dict[str, int] = field(default_factory=dict)
    partitions: list[str] = field(default_factory=list)  # PostgreSQL: GPS partitions dropped whole
    seen_ms: int | None = None  # the newest build: rows stored before it may go

    def lines(self) -> list[str]:
        out = [f"keep raw positions {self.keep_days} days; {self.reason}"]
        if self.cutoff_ms is not None:
            out.append(f"cut-off: {iso_ms(self.cutoff_ms)}")
            out += [f"{t:>14}: {n} rows older" for t, n in self.rows.items()]
            out += [f"{'partition':>14}: {name} (a whole month of positions)" for name in self.partitions]
        return out


def plan(conn: Any, keep_days: int, now_ms: int) -> Plan:
    """The cut-off and the rows older than it, per table (nothing is changed)."""
    if keep_days < 1:
        raise ValueError("keep_days must be at least 1")
    built = _newest_build(conn)
    if built is None:
        return Plan(keep_days, None, "no map has been built yet: nothing is dropped before one is")
    stored = _newest_stored(conn)
    # A clock far ahead of everything the centre has done is not believed: count from the
    # newest build or row stored (whichever is later), so a daily build keeps this at "now".
    ref = min(now_ms, max(built, stored if stored is not None else built))
    why = "rows stored after the newest map build are kept until one uses them"
    if ref < now_ms:
        why = f"counted from {iso_ms(ref)}, the newest map build or row stored, not the clock; {why}"
    cutoff = ref - keep_days * DAY_MS
    p = Plan(keep_days, cutoff, why, seen_ms=built)
    for table, col, extra in TARGETS:
        if dbapi.table_exists(conn, table):
            p.rows[table] = int(dbapi.fetchall(
                conn, f"SELECT count(*) FROM {table} AS x WHERE {col} < ?{extra}{_seen(table)}",
                _params(table, cutoff, built))[0][0])
    if _gps_partitioned(conn):
        p.partitions = [g.name for g in _expired_seen(conn, cutoff, built)]
    return p


def _seen(table: str) -> str:
    """The SQL condition (one ``?``, see ``_params``: the newest build's time) that a row of ``table`` was stored
    before that build, so the build could have used it. Rows of the fixes and positions follow
    their sample; a row with no stored time (a store older than the column) predates any build."""
    if table == "dead_letters":
        return ""  # never mapped: their own received time is the age
    if table == "samples":
        return " AND COALESCE(received_utc_ms, 0) < ?"
    return (" AND NOT EXISTS (SELECT 1 FROM samples s WHERE s.device = x.device AND s.epoch = x.epoch"
            " AND s.seq = x.seq AND COALESCE(s.received_utc_ms, 0) >= ?)")


def _params(table: str, cutoff_ms: int, seen_ms: int | None) -> tuple[int, ...]:
    return (cutoff_ms,) if table == "dead_letters" else (cutoff_ms, seen_ms or 0)


def _newest_stored(conn: Any) -> int | None:
    row = dbapi.fetchall(conn, "SELECT max(received_utc_ms) FROM samples") if dbapi.table_exists(
        conn, "samples") else []
    return None if not row or row[0][0] is None else int(row[0][0])


def apply(conn: Any, keep_days: int, now_ms: int, *,
          vacuum: Callable[[Any], None] | None = None) -> Plan:
    """Drop what ``plan`` finds, the rows in one transaction (all tables or none); the plan carried out.

    PostgreSQL's whole GPS partitions go first, in a short transaction of their own: detaching
    one locks its month exclusively, which must not last through the row deletes (the receiver's
    duplicate check reads every month), nor wait long behind an analyst's query (every ingest
    would then queue behind it): after ``PARTITION_LOCK_WAIT`` the partition is left, and the
    row deletes below remove its rows instead.
    """
    p = plan(conn, keep_days, now_ms)
    if p.cutoff_ms is None:
        return p
    if p.partitions:
        p.partitions = _drop_partitions(conn, p.cutoff_ms, p.seen_ms)
    with dbapi.transaction(conn):
        for table, col, extra in TARGETS:  # what is left: partly expired months, other tables
            if table in p.rows:
                dbapi.execute(conn, f"DELETE FROM {table} AS x WHERE {col} < ?{extra}{_seen(table)}",
                              _params(table, p.cutoff_ms, p.seen_ms))
    if vacuum is not None:
        vacuum(conn)  # the freed pages hold the positions until overwritten
    return p


PARTITION_LOCK_WAIT = "5s"


def _expired_seen(conn: Any, cutoff_ms: int, seen_ms: int) -> list[Any]:
    """The GPS partitions wholly before the cut-off and holding no row stored after the newest build."""
    from psycopg import sql

    from receiver import pg_samples

    return [g for g in pg_samples.expired_gps(conn, cutoff_ms) if conn.execute(
        sql.SQL("SELECT 1 FROM {} WHERE COALESCE(received_utc_ms, 0) >= %s LIMIT 1").format(sql.Identifier(g.name)),
        (seen_ms,)).fetchone() is None]


def _drop_partitions(conn: Any, cutoff_ms: int, seen_ms: int | None) -> list[str]:
    """Detach and drop the expired GPS partitions, one short transaction each; those dropped."""
    import psycopg

    from receiver import pg_samples

    dropped = []
    for g in _expired_seen(conn, cutoff_ms, seen_ms or 0):
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{PARTITION_LOCK_WAIT}'")
                pg_samples.drop_gps(conn, g)
            dropped.append(g.name)
        except psycopg.errors.LockNotAvailable:
            log.warning("retention: %s is busy (a long query?): its rows are deleted one by one instead", g.name)
    return dropped


def _gps_partitioned(conn: Any) -> bool:
    return not dbapi.is_sqlite(conn) and bool(dbapi.fetchall(
        conn, "SELECT 1 FROM pg_class WHERE oid = to_regclass('samples') AND relkind = 'p'"))


def _newest_build(conn: Any) -> int | None:
    if not dbapi.table_exists(conn, "aggregate_builds"):
        return None
    row = dbapi.fetchall(conn, "SELECT max(built_utc_ms) FROM aggregate_builds")
    return None if not row or row[0][0] is None else int(row[0][0])
