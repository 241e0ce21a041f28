"""v17 attack on schema 3's migration of a plain samples table: edge-of-type times in an old
store, and two `datalab-receiver migrate` processes started together.  Oracle: md5 of every
row's text before and after (my own SQL), exit codes, one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.pg import pg_cluster, pg_dsn  # noqa: F401

RCV = str(Path(sys.executable).with_name("datalab-receiver"))
OLD = """
CREATE SCHEMA datalab;
CREATE TABLE datalab.samples (
    device text, epoch text, seq bigint, sensor text, t_utc_ms bigint, t_mono_ms bigint, time_src text,
    boot_id text, vals jsonb, flags text, batch_id text, received_utc_ms bigint,
    PRIMARY KEY (device, epoch, seq));
"""
COLS = "device, epoch, seq, sensor, t_utc_ms, t_mono_ms, time_src, boot_id, vals, flags, batch_id, received_utc_ms"


def _md5(c: psycopg.Connection) -> tuple[int, str]:
    return c.execute(f"SELECT count(*), md5(string_agg(row({COLS})::text, '|' ORDER BY device, epoch, seq)) "
                     "FROM datalab.samples").fetchone()


@pytest.mark.parametrize("t", ["-1", "0", "253402300799999", "4611686018427387904", "-9223372036854775808"])
def test_old_store_with_edge_times_migrates_or_says_why(pg_dsn: str, t: str) -> None:  # noqa: F811
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(OLD)
        c.execute("INSERT INTO datalab.samples SELECT 'van-1','e',i,'pm', 1790000000000 + i*1000, i,'gps','b',"
                  "'{\"pm25\": 1}','', 'b1', 0 FROM generate_series(1, 50) i")
        c.execute(f"INSERT INTO datalab.samples VALUES ('van-1','e',999,'gps',{t},0,'gps','b','{{}}','','b1',0)")
        before = _md5(c)
    r = subprocess.run([RCV, "migrate", "--store", pg_dsn], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    print(t, r.returncode, out[-500:])
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        after = _md5(c)
    assert "Traceback" not in out, out[-2000:]
    assert after == before, (before, after)


def test_two_migrations_started_together(pg_dsn: str) -> None:  # noqa: F811
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute(OLD)
        c.execute("INSERT INTO datalab.samples SELECT 'van-' || (i % 4), 'e', i, CASE WHEN i % 3 = 0 THEN 'gps' "
                  "ELSE 'pm' END, CASE WHEN i % 97 = 0 THEN NULL ELSE 1780000000000 + i::bigint * 40000 END, i, "
                  "'gps','b', jsonb_build_object('v', i), '', 'b1', 0 FROM generate_series(1, 120000) i")
        before = _md5(c)
    ps = [subprocess.Popen([RCV, "migrate", "--store", pg_dsn], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in ps]
    print([p.returncode for p in ps], [o[-300:] for o in outs])
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        after = _md5(c)
        kind = c.execute("SELECT relkind FROM pg_class WHERE oid = to_regclass('datalab.samples')").fetchone()[0]
        left = c.execute("SELECT to_regclass('datalab.samples_unpartitioned')").fetchone()[0]
    assert kind == "p" and left is None and after == before, (kind, left, before, after)  # data first
    assert all(p.returncode == 0 for p in ps), outs
