"""PostgreSQL-only checks: several workers at once, transient failures, PostGIS, the factory.

The behaviour shared with SQLite is checked in test_store_contract.py.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import traceback
from typing import Any

import psycopg
import pytest

from receiver.store import SQLiteStore
from receiver.store_factory import open_store, sqlite_path
from receiver.store_pg import PostgresStore
from tests.pg import PgCluster, pg_cluster, pg_dsn  # noqa: F401  (fixtures, used by name)
from tests.test_receiver_store import RECEIVED, batch, put
from core.wire import Batch, content_hash, encode_batch

DEVICES = ("van-001", "van-002", "van-003", "van-004")
TICKS = 10  # 20 samples per batch


def fleet_plan(per_device: int = 50) -> list[tuple[str, int, range]]:
    """(van, first tick, ticks in a tunnel): ``per_device`` consecutive batches per van."""
    return [(dev, i * TICKS, range(100 + 40 * k, 125 + 40 * k))
            for k, dev in enumerate(DEVICES) for i in range(per_device)]


def fleet_batches(per_device: int = 50) -> list[Batch]:
    """Fresh batches for the plan (ingest marks samples, so each store gets its own)."""
    return [batch(t, TICKS, gps_off=off, device=dev) for dev, t, off in fleet_plan(per_device)]


def worker(dsn: str, seed: int, start: Any, results: Any) -> None:
    """One receiver process: opens the store (racing the other on the schema) and ingests all."""
    batches = fleet_batches()
    if seed >= 0:
        random.Random(seed).shuffle(batches)
    elif seed == -2:  # evens first, then odds: the other worker stores their neighbours meanwhile
        batches = batches[0::2] + batches[1::2]
    elif seed == -3:
        batches = batches[1::2] + batches[0::2]
    start.wait()
    try:
        store = PostgresStore(dsn)
        out = []
        for b in batches:
            payload = encode_batch(b)
            r = store.ingest(b, content_hash(payload), RECEIVED)
            out.append((b.batch_id, r.status, r.new_samples, r.duplicate_samples))
        store.close()
    except BaseException:
        results.put(traceback.format_exc())  # the test shows it rather than waiting for a result
        raise
    results.put(out)


def covered_without_position(store: PostgresStore, max_gap_ms: int) -> int:
    """Sensor samples with fixes on both sides within the gap, yet no position (as in test_end_to_end)."""
    return store.conn.execute(
        """
        SELECT count(*) FROM samples s
        LEFT JOIN positions p USING (device, epoch, seq)
        WHERE s.sensor <> 'gps'
          AND coalesce(p.state, '') NOT IN ('exact', 'interpolated')
          AND (SELECT min(f.t_utc_ms) FROM fixes f WHERE f.device = s.device AND f.t_utc_ms >= s.t_utc_ms)
            - (SELECT max(f.t_utc_ms) FROM fixes f WHERE f.device = s.device AND f.t_utc_ms <= s.t_utc_ms)
            <= %s
        """,
        (max_gap_ms,),
    ).fetchone()[0]


@pytest.mark.parametrize("seeds", [(1, 2), (-1, -1), (-2, -3)], ids=["shuffled", "same-order", "neighbours"])
def test_two_processes_ingest_the_same_batches(pg_dsn: str, seeds: tuple[int, int]) -> None:
    """Every batch delivered to both workers at once: each sample once, one stored + one duplicate."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(pg_dsn, seed, start, results)) for seed in seeds]
    for p in procs:
        p.start()
    start.set()
    outs = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    errors = [o for o in outs if isinstance(o, str)]
    assert not errors, "a worker failed:\n" + "\n".join(errors)
    assert [p.exitcode for p in procs] == [0, 0]
    expected = fleet_batches()
    n_samples = sum(len(b.samples) for b in expected)
    status: dict[str, list[str]] = {}
    for out in outs:
        assert len(out) == len(expected)
        for bid, st, _, _ in out:
            status.setdefault(bid, []).append(st)
    assert all(sorted(v) == ["duplicate", "stored"] for v in status.values())
    assert sum(new for out in outs for _, _, new, _ in out) == n_samples

    s = PostgresStore(pg_dsn)
    c = s.counts()
    assert c["samples"] == n_samples
    assert c["batches_stored"] == len(expected) and c["batches_duplicate"] == len(expected)
    assert c["samples_stored"] == n_samples and c["samples_duplicate"] == n_samples
    stored = set(s.conn.execute("SELECT device, epoch, seq FROM samples").fetchall())
    assert stored == {(b.device, b.epoch, x.seq) for b in expected for x in b.samples}
    # every sensor sample has a position, and none that had fixes around it was left open
    # (this needs the per-device lock: without it neighbouring batches miss each other's fixes)
    missing = s.conn.execute(
        "SELECT count(*) FROM samples s LEFT JOIN positions p USING (device, epoch, seq)"
        " WHERE s.sensor <> 'gps' AND p.state IS NULL"
    ).fetchone()[0]
    assert missing == 0
    assert covered_without_position(s, 10_000) == 0
    assert s.conn.execute("SELECT count(*) FROM positions WHERE state = 'no_fix'").fetchone()[0] > 0
    s.close()


def test_same_positions_as_sqlite_when_sequential(pg_dsn: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Same arrival order (out of order, with tunnels): the same positions in both backends."""
    plan = fleet_plan(20)
    random.Random(5).shuffle(plan)
    stores: list[Any] = [SQLiteStore(tmp_path / "ref.sqlite"), PostgresStore(pg_dsn)]
    for st in stores:
        for dev, t, off in plan:
            put(st, batch(t, TICKS, gps_off=off, device=dev))
    query = "SELECT device, seq, state, lat, lon FROM positions ORDER BY device, seq"
    a = stores[0].conn.execute(query).fetchall()
    b = stores[1].conn.execute(query).fetchall()
    assert [tuple(r) for r in a] == [tuple(r) for r in b]
    assert stores[0].counts() == stores[1].counts()
    for st in stores:
        st.close()


def test_transient_failures_are_retried(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = PostgresStore(pg_dsn)
    real = s._join_positions
    calls = {"n": 0}

    def flaky(*a: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise psycopg.errors.DeadlockDetected("simulated deadlock")
        real(*a)

    monkeypatch.setattr(s, "_join_positions", flaky)
    r = put(s, batch(0, 5))
    assert r.status == "stored" and calls["n"] == 2
    c = s.counts()
    assert c["batches_stored"] == 1 and c["samples"] == 10 and c["samples_stored"] == 10
    s.close()


def test_lost_connection_is_reopened(pg_dsn: str) -> None:
    s = PostgresStore(pg_dsn)
    put(s, batch(0, 2))
    pid = s.conn.info.backend_pid
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    r = put(s, batch(2, 2))  # the first attempt finds the connection dead
    assert r.status == "stored" and s.conn.info.backend_pid != pid
    assert s.counts()["samples"] == 8
    s.close()


def test_postgis_positions(pg_dsn: str, pg_cluster: PgCluster) -> None:  # noqa: F811
    if not pg_cluster.postgis:
        s = PostgresStore(pg_dsn)
        assert s.postgis is False
        s.close()
        pytest.skip("PostGIS is not installed here: checked that the store runs without it")
    s = PostgresStore(pg_dsn)
    assert s.postgis
    put(s, batch(0, 10))
    # the point follows lat/lon, and the nearest-neighbour query analysts use works
    lat, lon, x, y = s.conn.execute(
        "SELECT lat, lon, ST_X(geom), ST_Y(geom) FROM positions WHERE seq = 5"
    ).fetchone()
    assert (x, y) == (lon, lat)
    near = s.conn.execute(
        "SELECT seq FROM positions WHERE geom IS NOT NULL"
        " ORDER BY geom <-> ST_SetSRID(ST_MakePoint(4.6, 52.0003), 4326) LIMIT 1"
    ).fetchone()[0]
    assert near == 7  # pm at t=3.0 s: interpolated to lat 52.00028
    assert s.conn.execute("SELECT count(*) FROM positions WHERE state = 'no_fix' AND geom IS NOT NULL"
                          ).fetchone()[0] == 0
    assert s.conn.execute("SELECT 1 FROM pg_indexes WHERE indexname = 'positions_geom'").fetchone()
    s.close()


def test_postgis_enabled_on_a_plain_database(pg_cluster: PgCluster) -> None:  # noqa: F811
    """A database without the extension: the store creates it when the server has it."""
    dsn = pg_cluster.create_database(template="template0")
    s = PostgresStore(dsn)
    assert s.postgis == pg_cluster.postgis
    put(s, batch(0, 3))
    assert s.counts()["samples"] == 6
    s.close()


def test_without_postgis(pg_dsn: str) -> None:
    s = PostgresStore(pg_dsn, postgis=False, schema="plain")
    put(s, batch(0, 3))
    cols = {r[0] for r in s.conn.execute(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'plain' AND table_name = 'positions'")}
    assert "geom" not in cols and "lat" in cols
    s.close()


def test_open_store_picks_the_backend(pg_dsn: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = open_store(tmp_path / "a.sqlite", max_gap_s=5)
    b = open_store(f"sqlite:///{tmp_path}/b.sqlite")
    c = open_store(pg_dsn, max_gap_s=5)
    assert isinstance(a, SQLiteStore) and isinstance(b, SQLiteStore) and isinstance(c, PostgresStore)
    assert b.path == tmp_path / "b.sqlite" and a.max_gap_ms == c.max_gap_ms == 5000
    assert sqlite_path("sqlite:///rel/x.sqlite").as_posix() == "rel/x.sqlite"
    with pytest.raises(ValueError, match="unknown store URL"):
        open_store("mysql://x/y")
    for s in (a, b, c):
        s.close()
