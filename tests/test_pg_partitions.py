"""PostgreSQL samples by month and GPS / rest (issue 17, what was left of points 1 and 5):
retention drops an expired month's positions as a whole partition, and a store made with the
old plain ``samples`` is moved into the partitions when it opens, in batches, nothing lost."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from receiver import dbapi, pg_samples
from receiver.cli import main
from receiver.retention import DAY_MS, apply, plan
from receiver.store_pg import PostgresStore
from tests.datalab_synth import copy_to_postgres, make_store
from tests.pg import pg_cluster, pg_dsn  # noqa: F401  (fixtures, used by name)
from tests.test_receiver_store import batch, put
from core.wire import content_hash, encode_batch

START = dt.datetime(2026, 10, 30, 8, 0, tzinfo=dt.timezone.utc)  # five days: Oct 30 .. Nov 3
CUT = int(dt.datetime(2026, 11, 2, 0, 0, tzinfo=dt.timezone.utc).timestamp() * 1000)


def _partitions(c: Any) -> set[str]:
    return {r[0] for r in c.execute(
        "SELECT c.relname FROM pg_partition_tree('samples') t JOIN pg_class c ON c.oid = t.relid").fetchall()}


def _gps(c: Any, where: str = "") -> int:
    return int(c.execute(f"SELECT count(*) FROM samples WHERE sensor = 'gps'{where}", (CUT,) if where else ())
               .fetchone()[0])


@pytest.fixture
def city(pg_dsn: str, tmp_path: Path) -> str:  # noqa: F811
    """Two vans over five days across a month's end, maps built; GPS samples as the vans sent them."""
    copy_to_postgres(make_store(tmp_path / "s.sqlite", days=5, minutes=4, start=START), pg_dsn)
    store = PostgresStore(pg_dsn)
    with store.conn.transaction():  # the van's GPS samples, one a second (the synthetic store has fixes only)
        store.conn.execute("INSERT INTO samples (device, epoch, seq, sensor, t_utc_ms, vals)"
                           " SELECT device, epoch, seq + 1000000, 'gps', t_utc_ms,"
                           " jsonb_build_object('lat', lat, 'lon', lon) FROM fixes")
    # loaded straight into samples: the rows wait in samples_undated until their months are made
    store._ensure_months([int(START.timestamp() * 1000), CUT])
    store.close()
    return pg_dsn


def test_retention_drops_an_expired_months_positions_as_a_partition(city: str) -> None:
    c = dbapi.connect(city)
    assert {"samples_y2026m10_gps", "samples_y2026m10_rest", "samples_y2026m11_gps"} <= _partitions(c)
    assert c.execute("SELECT count(*) FROM samples_undated").fetchone()[0] == 0
    oct_values = c.execute("SELECT count(*) FROM samples_y2026m10_rest").fetchone()[0]
    maps = c.execute("SELECT count(*), sum(published) FROM aggregates").fetchone()
    day = (int(START.timestamp() * 1000), int(START.timestamp() * 1000) + DAY_MS)  # Oct 30, expired
    avg_q = "SELECT count(*), avg(value) FROM observations WHERE quantity = 'pm25' AND t_utc_ms >= %s AND t_utc_ms < %s"
    before_avg = c.execute(avg_q, day).fetchone()
    kept_gps, old_gps = _gps(c, " AND t_utc_ms >= %s"), _gps(c, " AND t_utc_ms < %s")
    assert oct_values > 0 and maps[0] > 0 and before_avg[0] > 0 and kept_gps > 0 and old_gps > 0

    now = CUT + 30 * DAY_MS  # keep 30 days: Oct 30 .. Nov 1 expired (Oct whole, Nov partly)
    p = plan(c, 30, now)
    assert p.cutoff_ms == CUT and p.partitions == ["samples_y2026m10_gps"]
    assert "samples_y2026m10_gps (a whole month of positions)" in "\n".join(p.lines())
    apply(c, 30, now)

    left = _partitions(c)
    assert "samples_y2026m10_gps" not in left  # detached and dropped: no table of that name at all
    assert c.execute("SELECT to_regclass('samples_y2026m10_gps')").fetchone()[0] is None
    assert {"samples_y2026m10_rest", "samples_y2026m11_gps"} <= left  # November's positions: a partial month
    assert _gps(c, " AND t_utc_ms < %s") == 0 and _gps(c, " AND t_utc_ms >= %s") == kept_gps
    assert c.execute("SELECT count(*) FROM fixes WHERE t_utc_ms < %s", (CUT,)).fetchone()[0] == 0
    assert c.execute("SELECT count(*) FROM fixes WHERE t_utc_ms >= %s", (CUT,)).fetchone()[0] > 0
    # measured values and maps stay, and an analyst's query over the expired day still answers
    assert c.execute("SELECT count(*) FROM samples_y2026m10_rest").fetchone()[0] == oct_values
    assert c.execute("SELECT count(*), sum(published) FROM aggregates").fetchone() == maps
    assert c.execute(avg_q, day).fetchone() == pytest.approx(before_avg)
    assert c.execute("SELECT count(*) FROM observations WHERE lat IS NOT NULL AND t_utc_ms < %s",
                     (CUT,)).fetchone()[0] == 0  # no place left for the expired values
    c.close()
    # a late upload of an expired month's GPS still has a home (the month's rest), and goes next time
    store = PostgresStore(city)
    late = batch(0, 3, device="van-late")
    for s in late.samples:
        s.t_utc_ms = int(START.timestamp() * 1000) + s.t_mono_ms
    assert store.ingest(late, content_hash(encode_batch(late)), CUT).status == "stored"
    assert store.conn.execute("SELECT count(*) FROM samples_y2026m10_rest WHERE sensor = 'gps'").fetchone()[0] == 3
    store.close()
    r = CliRunner().invoke(main, ["retention", "--store", city, "--keep-days", "30", "--apply"])
    assert r.exit_code == 0, r.output
    with psycopg.connect(city, autocommit=True) as c2:  # real now: everything before the newest build
        assert c2.execute("SELECT count(*) FROM datalab.samples WHERE sensor = 'gps'"
                          " AND t_utc_ms < %s", (CUT,)).fetchone()[0] == 0


def test_a_busy_partition_is_left_and_its_rows_deleted(city: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An analyst's long query on an expired month: retention does not queue every ingest behind it."""
    from receiver import retention

    monkeypatch.setattr(retention, "PARTITION_LOCK_WAIT", "300ms")
    with psycopg.connect(city, autocommit=True) as analyst, analyst.transaction():
        analyst.execute("SELECT count(*) FROM datalab.samples_y2026m10_gps")  # holds its lock until commit
        c = dbapi.connect(city)
        p = apply(c, 30, CUT + 30 * DAY_MS)
        assert p.partitions == []  # left: the report says no partition went whole
        assert "samples_y2026m10_gps" in _partitions(c)
        assert _gps(c, " AND t_utc_ms < %s") == 0  # ... and its rows went one by one instead
        c.close()


# The schema before issue 17's partitions: samples a plain table with its primary key.
_OLD_SAMPLES = """
CREATE SCHEMA datalab;
CREATE TABLE datalab.samples (
    device text, epoch text, seq bigint, sensor text, t_utc_ms bigint, t_mono_ms bigint, time_src text,
    boot_id text, vals jsonb, flags text, batch_id text, received_utc_ms bigint,
    PRIMARY KEY (device, epoch, seq));
"""


def test_an_old_plain_samples_is_moved_into_partitions_when_the_store_opens(
        pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(_OLD_SAMPLES)
        # 3 months of rows, some without a time; 2,500 rows
        c.execute("INSERT INTO datalab.samples SELECT 'van-' || (i % 3), 'e', i, CASE WHEN i % 2 = 0 THEN 'gps'"
                  " ELSE 'pm' END, CASE WHEN i % 100 = 7 THEN NULL ELSE 1788000000000 + i::bigint * 2400000 END, i,"
                  " 'gps', 'b', jsonb_build_object('pm25', i), '', 'b1', 0 FROM generate_series(1, 2500) i")
        want = c.execute("SELECT md5(string_agg(s::text, '|' ORDER BY device, epoch, seq)) FROM datalab.samples s"
                         ).fetchone()[0]
    # a migration killed half-way: the first batch commits, then the receiver dies
    monkeypatch.setattr(pg_samples, "MIGRATE_BATCH", 700)
    real = pg_samples.move_batch
    calls = []

    def dies_after_one(c: Any, n: int = 700) -> int:
        calls.append(n)
        if len(calls) > 1:
            raise KeyboardInterrupt  # killed
        return real(c, n)

    monkeypatch.setattr(pg_samples, "move_batch", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        PostgresStore(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        moved = c.execute("SELECT count(*) FROM datalab.samples").fetchone()[0]
        rest = c.execute("SELECT count(*) FROM datalab.samples_unpartitioned").fetchone()[0]
        assert (moved, rest) == (700, 1800)  # each row in exactly one of the two tables
    monkeypatch.setattr(pg_samples, "move_batch", real)
    store = PostgresStore(pg_dsn)  # the next start goes on, batch by batch, and finishes
    c = store.conn
    assert c.execute("SELECT to_regclass('samples_unpartitioned')").fetchone()[0] is None
    assert c.execute("SELECT relkind FROM pg_class WHERE oid = 'samples'::regclass").fetchone()[0] == "p"
    got = c.execute("SELECT md5(string_agg(s::text, '|' ORDER BY device, epoch, seq)) FROM samples s").fetchone()[0]
    assert got == want  # every row, every column
    where = dict(c.execute("SELECT tableoid::regclass::text, count(*) FROM samples GROUP BY 1").fetchall())
    assert where["samples_undated"] == 25 and where["samples_y2026m08_gps"] > 0 and where["samples_y2026m09_rest"] > 0
    assert c.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 3
    # the store works as a new one: a batch again is a duplicate, a new one is stored
    assert put(store, batch(0, 5)).status == "stored"
    assert put(store, batch(0, 5)).status == "duplicate"
    store.close()


def test_the_migrate_command_moves_an_old_store_now(pg_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(_OLD_SAMPLES)
        c.execute("CREATE VIEW public.my_pm AS SELECT * FROM datalab.samples WHERE sensor = 'pm'")  # an analyst's
        c.execute("INSERT INTO datalab.samples SELECT 'van-1', 'e', i, 'pm', 1788000000000 + i::bigint * 1000,"
                  " i, 'gps', 'b', '{}', '', 'b1', 0 FROM generate_series(1, 10) i")
    r = CliRunner().invoke(main, ["migrate", "--store", pg_dsn])
    assert r.exit_code == 0 and "samples partitioned by month" in r.output, r.output
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        assert c.execute("SELECT count(*) FROM datalab.samples_y2026m08_rest").fetchone()[0] == 10
        # the analyst's view followed the rename: the emptied old table stays for it, the store works
        assert c.execute("SELECT count(*) FROM datalab.samples_unpartitioned").fetchone()[0] == 0
        c.execute("CREATE OR REPLACE VIEW public.my_pm AS SELECT * FROM datalab.samples WHERE sensor = 'pm'")
    assert CliRunner().invoke(main, ["migrate", "--store", pg_dsn]).exit_code == 0
    with psycopg.connect(pg_dsn, autocommit=True) as c:  # nothing depends on it any more: dropped
        assert c.execute("SELECT to_regclass('datalab.samples_unpartitioned')").fetchone()[0] is None
        assert c.execute("SELECT count(*) FROM public.my_pm").fetchone()[0] == 10
    missing = tmp_path / "nowhere" / "x.sqlite"
    r = CliRunner().invoke(main, ["migrate", "--store", str(missing)])
    assert r.exit_code == 2 and "no store" in r.output and not missing.parent.exists()


_ROW = "device, epoch, seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags, batch_id, received_utc_ms"


def _md5(c: Any) -> tuple[int, str]:
    return c.execute(f"SELECT count(*), md5(string_agg(row({_ROW})::text, '|' ORDER BY device, epoch, seq))"
                     " FROM datalab.samples").fetchone()


@pytest.mark.parametrize("t", ["253402300799999", "4611686018427387904", "-9223372036854775808"])
def test_an_old_row_with_an_impossible_time_moves_as_it_is(pg_dsn: str, t: str) -> None:  # noqa: F811
    """v17 finding 9: a year-9999 / 2^62 / int64-min time crashed every open of the store."""
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(_OLD_SAMPLES)
        c.execute("INSERT INTO datalab.samples SELECT 'van-1', 'e', i, 'pm', 1790000000000 + i * 1000, i, 'gps',"
                  " 'b', '{\"pm25\": 1}', '', 'b1', 0 FROM generate_series(1, 20) i")
        c.execute(f"INSERT INTO datalab.samples VALUES ('van-1','e',999,'gps',{t},0,'gps','b','{{}}','','b1',0)")
        before = _md5(c)
    PostgresStore(pg_dsn).close()
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        assert _md5(c) == before  # every row, the odd time unchanged
        assert c.execute("SELECT count(*) FROM datalab.samples_undated WHERE seq = 999").fetchone()[0] == 1


def test_two_migrate_commands_started_together(pg_dsn: str) -> None:  # noqa: F811
    """v17 finding 8: the second died with 'relation "samples_unpartitioned" does not exist'."""
    import subprocess
    import sys

    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(_OLD_SAMPLES)
        c.execute("INSERT INTO datalab.samples SELECT 'van-' || (i % 4), 'e', i, 'pm', 1780000000000"
                  " + i::bigint * 40000, i, 'gps', 'b', '{}', '', 'b1', 0 FROM generate_series(1, 60000) i")
        before = _md5(c)
    prog = str(Path(sys.executable).with_name("datalab-receiver"))
    ps = [subprocess.Popen([prog, "migrate", "--store", pg_dsn], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in ps]
    assert [p.returncode for p in ps] == [0, 0], outs
    assert not any("Traceback" in o for o in outs), outs
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        assert _md5(c) == before
        assert c.execute("SELECT to_regclass('datalab.samples_unpartitioned')").fetchone()[0] is None
