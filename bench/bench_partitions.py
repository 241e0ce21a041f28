"""PostgreSQL ingest with ``samples`` partitioned (month, then GPS / rest) against a plain table.

Issue 17 left it open whether the partitions cost ingest speed ("20-40 % slower", measured
on a loaded machine across separate runs). Here both go in the same run, alternating, on the
same batches as bench_ingest (8 vans, sealed batches of 2000 samples), one worker:

* ``ack path``: what a worker does before it acknowledges (``ingest_many(derive=False)``,
  16 uploads a transaction): the duplicate check, which on the partitioned table has no
  primary key and probes each month's (device, epoch, seq) index, and the insert that
  routes every row to its month and sensor partition;
* ``inline``: storing and deriving in one transaction (which reads samples back for the
  quality context), on half the batches.

The plain table is a store made before partitioning, kept plain for the comparison (the
receiver would otherwise migrate it when it opens: that step is switched off here only).
Best and median of REPEATS alternating runs each; baseline: the plain table.
Measured 2026-12-06 (bench/results/2026-12-06-1805-vm-partitions.md, a shared VM under load,
so the medians matter more than the bests): ack path 0.78x the plain table, inline 0.74x.

    python bench/bench_partitions.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_ingest import make_batches, timed

REPEATS = 5  # ~7 min on a loaded 2-core VM (2026-12-06): run it alone

# A samples table as stores made before issue 17 have it (store_pg keeps it plain when not migrating).
_PLAIN = """
CREATE SCHEMA datalab;
CREATE TABLE datalab.samples (
    device text NOT NULL, epoch text NOT NULL, seq bigint NOT NULL, sensor text NOT NULL,
    t_utc_ms bigint, t_mono_ms bigint, time_src text, boot_id text, vals jsonb, flags text,
    batch_id text, received_utc_ms bigint, PRIMARY KEY (device, epoch, seq));
"""


def _store(cluster: Any, plain: bool) -> str:
    import psycopg

    from receiver.store_pg import PostgresStore

    dsn = cluster.create_database()
    if plain:
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(_PLAIN)
    s = PostgresStore(dsn)
    kind = s.conn.execute("SELECT relkind FROM pg_class WHERE oid = 'samples'::regclass").fetchone()[0]
    assert kind == ("r" if plain else "p"), kind
    s.close()
    return str(dsn)


def run() -> list[dict]:
    from receiver import pg_samples
    from tests.pg import PgCluster

    # the plain store stays plain (forked workers inherit this); a partitioned one has nothing to
    # migrate. Put back afterwards: `python -m bench` runs other benches in this process.
    saved = pg_samples.BEGIN_MIGRATION, pg_samples.migrate
    pg_samples.BEGIN_MIGRATION = "SELECT 1"
    pg_samples.migrate = lambda *a, **k: 0  # type: ignore[assignment]
    batches = make_batches()
    half = batches[: len(batches) // 2]
    got: dict[tuple[str, bool], list[float]] = {}
    cluster = PgCluster(settings={}).start()  # durable defaults, as bench_ingest
    try:
        for _ in range(REPEATS):
            for kind, load in (("store", batches), ("store_inline", half)):
                for plain in (True, False):  # alternating: a disturbance hits both alike
                    got.setdefault((kind, plain), []).append(timed(kind, _store(cluster, plain), load, 1))
    finally:
        cluster.stop()
        pg_samples.BEGIN_MIGRATION, pg_samples.migrate = saved
    rows = []
    for kind, label in (("store", "ack path"), ("store_inline", "inline (store + derive)")):
        part, plain = got[(kind, False)], got[(kind, True)]
        for how, f in (("best", max), ("median", statistics.median)):
            rows.append({"name": f"partitions.pg.{kind}.{how}", "value": round(f(part)),
                         "unit": f"values/s, {label}, partitioned; baseline: plain samples",
                         "baseline": round(f(plain)), "target": None, "ok": None})
        rows.append({"name": f"partitions.pg.{kind}.ratio", "value": round(statistics.median(part) /
                     statistics.median(plain), 3), "unit": "partitioned / plain (medians)", "baseline": 1.0,
                     "target": None, "ok": None})
    return rows


def main() -> None:
    from bench import print_table

    print_table(run())


if __name__ == "__main__":
    main()
