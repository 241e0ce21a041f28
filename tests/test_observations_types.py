"""The observations view serves numbers and nulls only, the same on SQLite and PostgreSQL
(issue 15, v5 finding 8: "n/a" and true in pm25 gave 13 export rows on PostgreSQL, 11 on SQLite)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from core.sample import Sample, TimeSource
from receiver import dbapi
from receiver.export import export_measurements
from receiver.store import SQLiteStore
from receiver.store_pg import PostgresStore
from tests.pg import pg_cluster, pg_dsn  # noqa: F401  (fixtures, used by name)
from tests.test_receiver_store import T, put
from core.wire import Batch

PM25: list[Any] = [10.0 + 0.1 * k for k in range(10)] + ["n/a", True, None, 12.0]


def fill(store: Any) -> None:
    samples = []
    for k, v in enumerate(PM25):
        t = T + k * 1000
        samples.append(Sample("pm", t, k * 1000, TimeSource.GPS, {"pm25": v}, (), 2 * k + 1))
        samples.append(Sample("gps", t, k * 1000, TimeSource.GPS, {"lat": 52.1, "lon": 4.6, "fix_quality": 1},
                              (), 2 * k + 2))
    put(store, Batch("van-o", "e1", 1, 2 * len(PM25), samples))
    store.close()


def views(url: str) -> tuple[list[tuple[Any, ...]], list[dict[str, str]]]:
    conn = dbapi.connect(url)
    rows = dbapi.fetchall(conn, "SELECT seq, quantity FROM observations ORDER BY seq")
    buf = io.StringIO()
    export_measurements(conn, buf, "csv", quantities=("pm25",))
    conn.close()
    return [tuple(r) for r in rows], list(csv.DictReader(io.StringIO(buf.getvalue())))


def test_both_stores_serve_numbers_and_nulls_only(tmp_path: Path, pg_dsn: str) -> None:  # noqa: F811
    fill(SQLiteStore(tmp_path / "d.sqlite"))
    fill(PostgresStore(pg_dsn))
    lite, pg = views(str(tmp_path / "d.sqlite")), views(pg_dsn)
    # the view: every number and the null, never "n/a" or true (seqs 21 and 23)
    assert lite[0] == pg[0] == [(2 * k + 1, "pm25") for k, v in enumerate(PM25) if v is None or
                                 (isinstance(v, float))]
    assert len(lite[1]) == len(pg[1]) == 12  # 11 numbers and the null
    assert [r["value"] for r in lite[1]] == [r["value"] for r in pg[1]]
