"""The layout of ``samples`` on PostgreSQL: month partitions, each split into GPS and the rest.

Why two levels: retention drops a van's raw positions (the GPS samples) after N days but
keeps the measured values (docs/privacy.md). With months alone, an expired month's partition
holds both, and only row deletes could separate them (slow, and the freed pages keep the
positions until vacuumed). With each month split by sensor, an expired month's GPS positions
are one table that is detached and dropped whole (``drop_expired_gps``), and the month's
measured values stay in its ``_rest`` partition::

    samples                        PARTITION BY RANGE (t_utc_ms)
      samples_y2026m09             PARTITION BY LIST (sensor), FOR VALUES FROM .. TO ..
        samples_y2026m09_gps       FOR VALUES IN ('gps')
        samples_y2026m09_rest      DEFAULT
      samples_undated              DEFAULT (no time; rows loaded before their month existed)

Queries are unchanged: ``observations`` reads ``sensor NOT IN ('gps', ...)``, which prunes the
GPS partitions, and a time window prunes the months. Months made by schema version 2 (one
table a month) are kept as they are; retention deletes their rows as before.

A store made before partitioning (a plain ``samples`` with a primary key) is migrated when it
opens (``begin_migration`` in the schema transaction, then ``migrate``): the plain table is
renamed ``samples_unpartitioned``, the partitioned one made, and the rows moved over in
batches of their own transactions (each row is in exactly one of the two tables at every
commit; a migration killed half-way goes on at the next start). Every receiver that opens the
store helps until the old table is empty, and none ingests before, so the duplicate check of
``_insert_new_samples`` always sees every stored sample.
"""

from __future__ import annotations

import calendar
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from psycopg import errors, sql

log = logging.getLogger(__name__)

LEGACY = "samples_unpartitioned"  # a plain samples table being moved into the partitioned one
MIGRATE_BATCH = 50_000  # rows per transaction: minutes of a city's uploads, seconds of work
_COLS = ("device", "epoch", "seq", "sensor", "t_utc_ms", "t_mono_ms", "time_src", "boot_id",
         "vals", "flags", "batch_id", "received_utc_ms")
DAY_MS = 86_400_000


def month_start(ms: int) -> int:
    """The first millisecond (UTC) of the month ``ms`` falls in."""
    t = time.gmtime(ms // 1000)
    return int(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))) * 1000


def next_month(start: int) -> int:
    return month_start(start + 32 * DAY_MS)


def month_name(start: int) -> str:
    return "samples_" + time.strftime("y%Ym%m", time.gmtime(start / 1000))


def _children(c: Any, parent: str) -> dict[str, str]:
    """The partitions of ``parent``: name -> relkind ('r' a table, 'p' partitioned itself)."""
    rows = c.execute("SELECT p.relname, p.relkind FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid"
                     " WHERE i.inhparent = %s::regclass", (parent,)).fetchall()
    return {r[0]: r[1] for r in rows}


def make_month(c: Any, start: int) -> None:
    """One month's partition of samples (split GPS / rest), taking over its rows from samples_undated."""
    name, end = month_name(start), next_month(start)
    if name in _children(c, "samples"):
        return
    # PostgreSQL refuses a partition whose rows sit in the default one: move them over.
    c.execute("CREATE TEMP TABLE month_rows ON COMMIT DROP AS SELECT * FROM samples_undated"
              " WHERE t_utc_ms >= %s AND t_utc_ms < %s", (start, end))
    moved = c.execute("DELETE FROM samples_undated WHERE t_utc_ms >= %s AND t_utc_ms < %s", (start, end)).rowcount
    ident = sql.Identifier(name)
    c.execute(sql.SQL("CREATE TABLE {} PARTITION OF samples FOR VALUES FROM ({}) TO ({}) PARTITION BY LIST (sensor)")
              .format(ident, sql.Literal(start), sql.Literal(end)))
    c.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES IN ('gps')")
              .format(sql.Identifier(name + "_gps"), ident))
    c.execute(sql.SQL("CREATE TABLE {} PARTITION OF {} DEFAULT").format(sql.Identifier(name + "_rest"), ident))
    if moved:
        c.execute("INSERT INTO samples SELECT * FROM month_rows")
        log.info("samples: %d rows of %s moved from samples_undated to their month", moved, name)
    c.execute("DROP TABLE month_rows")


# -- migration of a plain samples table ---------------------------------------------------

# Run in the schema transaction before the tables are made: a plain samples steps aside, and
# CREATE TABLE IF NOT EXISTS samples then makes the partitioned one (views are made again after).
BEGIN_MIGRATION = f"""
DO $$
BEGIN
  IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('samples')) = 'r'
     AND to_regclass('{LEGACY}') IS NULL THEN
    ALTER TABLE samples RENAME TO {LEGACY};
    RAISE NOTICE 'samples is a plain table: moving it into monthly partitions';
  END IF;
END $$;
"""


def legacy_exists(c: Any) -> bool:
    return c.execute("SELECT to_regclass(%s) IS NOT NULL", (LEGACY,)).fetchone()[0]  # type: ignore[no-any-return]


# Times a month partition can be made for (1900-01 to 9999-11, UTC). An old store's row outside
# (a van's broken clock: year 9999, 2^62, int64's minimum) crashed every open of the store while
# its month was computed (v17 finding 9); it moves into samples_undated as it is, nothing changed.
MONTHS_FROM_MS = -2_208_988_800_000
MONTHS_UNTIL_MS = 253_399_622_400_000


def legacy_months(c: Any) -> list[int]:
    """Month starts (ms) of the rows still in the old table (one scan), those with a possible time."""
    rows = c.execute(
        f"SELECT DISTINCT (extract(epoch FROM date_trunc('month', to_timestamp(t_utc_ms / 1000.0)"
        f" AT TIME ZONE 'UTC')) * 1000)::bigint FROM {LEGACY} WHERE t_utc_ms >= %s AND t_utc_ms < %s",
        (MONTHS_FROM_MS, MONTHS_UNTIL_MS)).fetchall()
    odd = c.execute(f"SELECT count(*) FROM {LEGACY} WHERE t_utc_ms < %s OR t_utc_ms >= %s",
                    (MONTHS_FROM_MS, MONTHS_UNTIL_MS)).fetchone()[0]
    if odd:
        log.warning("samples migration: %d rows with an impossible time (before 1900 or after 9999) are kept"
                    " as they are in samples_undated", odd)
    return sorted(int(r[0]) for r in rows)


def move_batch(c: Any, n: int = MIGRATE_BATCH) -> int:
    """Move up to ``n`` rows from the old table into samples, in the caller's transaction; how many.

    SKIP LOCKED: receivers starting together each move other rows.
    """
    cols = sql.SQL(", ").join(map(sql.Identifier, _COLS))
    return int(c.execute(sql.SQL(
        "WITH moved AS (DELETE FROM {old} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {old} LIMIT %s"
        " FOR UPDATE SKIP LOCKED)) RETURNING {cols}) INSERT INTO samples ({cols}) SELECT {cols} FROM moved"
    ).format(old=sql.Identifier(LEGACY), cols=cols), (n,)).rowcount)


def drop_legacy_if_empty(c: Any) -> bool:
    """Drop the old table if no row is left (in the caller's transaction); whether it is gone.

    The exclusive lock first: a batch another receiver has not committed yet may still roll
    its rows back into the table, and they must not be dropped with it.
    """
    if not legacy_exists(c):
        return True
    c.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(LEGACY)))
    if c.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(LEGACY))).fetchone()[0]:
        return False
    try:
        with c.transaction():  # a savepoint: the empty table may stay, the receiver goes on
            c.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(LEGACY)))
    except errors.DependentObjectsStillExist:
        # An analyst's own view on samples followed the rename: every row is moved, so only the
        # empty table stays for it; the next start drops it once the view is made on samples again.
        log.warning("samples migration: %s is empty but views of yours depend on it; make them on samples"
                    " again and drop it (the receiver drops it at a start once nothing depends on it)", LEGACY)
    return True


def migrate(c: Any, ensure_months: Callable[[Iterable[int]], None],
            in_tx: Callable[[Callable[[Any], Any]], Any], batch: int | None = None) -> int:
    """Move a plain samples table's rows into the partitioned one, batch by batch; rows moved.

    ``ensure_months`` makes the months' partitions; ``in_tx(work)`` runs ``work(conn)`` in a
    transaction of its own (retried on transient conflicts).
    """
    if not legacy_exists(c):
        return 0
    try:
        ensure_months(legacy_months(c))
    except errors.UndefinedTable:  # another receiver (or `migrate`) has just finished it
        return 0
    size = batch or MIGRATE_BATCH
    total = 0
    while True:
        try:
            n = in_tx(lambda c: move_batch(c, size))
        except errors.UndefinedTable:  # the other one dropped the emptied table meanwhile: done
            break
        total += n
        if n:
            log.info("samples migration: %d rows moved into the partitions (%d so far)", n, total)
            continue
        if in_tx(drop_legacy_if_empty):
            break
        time.sleep(0.2)  # another receiver holds the last rows: its batch commits (or returns them)
    log.info("samples migration finished: %d rows moved by this receiver", total)
    return total


# -- retention by whole partitions ------------------------------------------------------------

@dataclass(frozen=True)
class GpsPartition:
    month: str  # the month's partition (its parent)
    name: str  # the month's GPS partition
    end_ms: int  # first millisecond after the month


def gps_partitions(c: Any) -> list[GpsPartition]:
    """The months' GPS partitions, oldest first (months made by schema 2 have none)."""
    rows = c.execute(
        "SELECT m.relname, g.relname, pg_get_expr(m.relpartbound, m.oid) FROM pg_inherits im"
        " JOIN pg_class m ON m.oid = im.inhrelid"
        " JOIN pg_inherits ig ON ig.inhparent = m.oid JOIN pg_class g ON g.oid = ig.inhrelid"
        " WHERE im.inhparent = 'samples'::regclass AND g.relname = m.relname || '_gps'").fetchall()
    out = []
    for month, gps, bound in rows:
        # bound: FOR VALUES FROM ('1788...') TO ('1790...')
        end = int(bound.rsplit("TO", 1)[1].strip(" ()'"))
        out.append(GpsPartition(month, gps, end))
    return sorted(out, key=lambda p: p.end_ms)


def expired_gps(c: Any, cutoff_ms: int) -> list[GpsPartition]:
    """The GPS partitions whose whole month lies before the cut-off."""
    return [p for p in gps_partitions(c) if p.end_ms <= cutoff_ms]


def drop_gps(c: Any, p: GpsPartition) -> None:
    """Detach and drop one month's GPS partition (in the caller's transaction).

    Late GPS rows of that month (an old batch uploaded after) land in the month's ``_rest``
    partition; retention deletes them by row.
    """
    c.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(sql.Identifier(p.month), sql.Identifier(p.name)))
    c.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(p.name)))
