"""v17 attack on #17.1/#17.5 partition edges: rows at the last/first millisecond of a month land in
the right month (my oracle: datetime in UTC), and retention with the cut-off at the last ms of a
month keeps that ms's position (t < cut-off only)."""
from __future__ import annotations

import datetime as dt
import uuid

import psycopg
import pytest

from core.wire import content_hash, encode_batch
from receiver import dbapi
from receiver.aggregate import create_tables
from receiver.retention import DAY_MS, apply
from tests.pg import PgCluster, pg_cluster  # noqa: F401
from tests.test_receiver_store import T, batch

DEC1 = int(dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc).timestamp() * 1000)


def _at(b, t0: int):
    base = min(s.t_utc_ms for s in b.samples)
    for s in b.samples:
        s.t_utc_ms = t0 + (s.t_utc_ms - base)
    return b


def test_month_edges_and_cutoff_at_last_ms(pg_cluster: PgCluster) -> None:  # noqa: F811
    from receiver.store_pg import PostgresStore
    url = pg_cluster.create_database(f"v17p_{uuid.uuid4().hex[:8]}")
    s = PostgresStore(url)
    # batch whose gps samples straddle the month edge: first gps sample 200 ms after pm; put pm at DEC1-1200
    b = _at(batch(0, 3, epoch="edge"), DEC1 - 1200)
    s.ingest(b, content_hash(encode_batch(b)), DEC1 + 3_600_000)
    s.close()
    with psycopg.connect(url, autocommit=True) as c:
        rows = c.execute("select sensor, t_utc_ms, tableoid::regclass::text from datalab.samples "
                         "where epoch='edge' order by t_utc_ms").fetchall()
        for sensor, t, part in rows:
            when = dt.datetime.fromtimestamp(t / 1000, dt.timezone.utc)
            want = f"samples_y{when.year}m{when.month:02d}_{'gps' if sensor == 'gps' else 'rest'}"
            assert part.split(".")[-1] == want, (sensor, t, when, part, want)
    conn = dbapi.connect(url)
    create_tables(conn)
    dbapi.execute(conn, "INSERT INTO aggregate_builds (scheme, period, built_utc_ms) VALUES ('segment','all',?)",
                  (DEC1 + 10 * DAY_MS,))
    gps = sorted(t for sn, t, _ in rows if sn == "gps")
    cut = gps[0]  # a position exactly at the cut-off must stay (only t < cut-off goes)
    apply(conn, 30, cut + 30 * DAY_MS)
    left = sorted(r[0] for r in dbapi.fetchall(conn, "SELECT t_utc_ms FROM samples WHERE sensor='gps' AND epoch='edge'"))
    conn.close()
    print("gps times", [dt.datetime.fromtimestamp(t / 1000, dt.timezone.utc).isoformat() for t in gps],
          "cut", cut, "left", left)
    assert left == [t for t in gps if t >= cut], (gps, cut, left)
