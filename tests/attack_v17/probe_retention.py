"""v17 attack on #17.5 retention: "positions no build has used yet are kept whatever their age".

Oracle: my own bookkeeping of which batches arrived before / after the newest map build, and
plain SQL counts per (epoch) -- not the retention module's plan.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from core.wire import content_hash, encode_batch
from receiver import dbapi
from receiver.aggregate import create_tables
from receiver.retention import DAY_MS, apply
from receiver.store import SQLiteStore
from tests.pg import PgCluster, pg_cluster  # noqa: F401
from tests.test_receiver_store import T, batch

BUILD = T + 200 * DAY_MS  # the newest map build ran at this wall time


def _shift(b: Any, dt_ms: int) -> Any:
    for s in b.samples:
        s.t_utc_ms += dt_ms
    return b


def _open(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Any, str]:
    if kind == "sqlite":
        url = str(tmp_path / "d.sqlite")
        return SQLiteStore(url), url
    from receiver.store_pg import PostgresStore
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    url = cluster.create_database(f"v17_{uuid.uuid4().hex[:10]}")
    return PostgresStore(url), url


def _gps_by_epoch(conn: Any) -> dict[str, int]:
    rows = dbapi.fetchall(conn, "SELECT epoch, count(*) FROM samples WHERE sensor = 'gps' GROUP BY epoch")
    return {e: int(n) for e, n in rows}


def _pos_by_epoch(conn: Any) -> dict[str, int]:
    rows = dbapi.fetchall(conn, "SELECT epoch, count(*) FROM positions WHERE lat IS NOT NULL GROUP BY epoch")
    return {e: int(n) for e, n in rows}


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_late_backlog_never_seen_by_a_build_is_dropped(kind: str, tmp_path: Path,
                                                       request: pytest.FixtureRequest) -> None:
    """A van in the workshop for ~100 days uploads its backlog AFTER the newest map build.

    Its positions (sample time 100 days back) were never available to any build, so by the
    documented policy they must be kept until a build uses them.
    """
    store, url = _open(kind, tmp_path, request)
    # 1. a van drove 100 days before the build and was mapped (arrived in time)
    seen = _shift(batch(0, 10, epoch="seen"), 100 * DAY_MS)
    store.ingest(seen, content_hash(encode_batch(seen)), T + 100 * DAY_MS + 3_600_000)
    conn = dbapi.connect(url)
    create_tables(conn)
    dbapi.execute(conn, "INSERT INTO aggregate_builds (scheme, period, built_utc_ms) VALUES ('segment','all',?)",
                  (BUILD,))
    if not dbapi.is_sqlite(conn):
        conn.commit()
    # 2. AFTER the build: the other van's backlog from the same days arrives (received BUILD + 1 h)
    late = _shift(batch(0, 10, device="van-002", epoch="late"), 100 * DAY_MS)
    store.ingest(late, content_hash(encode_batch(late)), BUILD + 3_600_000)
    store.close()
    before_gps, before_pos = _gps_by_epoch(conn), _pos_by_epoch(conn)
    assert before_gps == {"seen": 10, "late": 10}, before_gps
    assert before_pos.get("late", 0) >= 9, before_pos  # the last one waits for a next fix
    # retention runs the next day with keep 90 days (default)
    apply(conn, 90, BUILD + DAY_MS)
    after_gps, after_pos = _gps_by_epoch(conn), _pos_by_epoch(conn)
    conn.close()
    assert after_gps.get("seen", 0) == 0  # mapped and old: gone (as documented)
    # The documented promise: no build used the late van's positions -> they must still be there.
    assert after_gps.get("late", 0) == 10 and after_pos.get("late", 0) == before_pos["late"], (
        f"late backlog positions dropped before any map used them: gps {after_gps}, positions {after_pos}")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_clock_jumped_forward_drops_positions_younger_than_keep_days(kind: str, tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    """The server clock jumps 5 years ahead (bad RTC / NTP), the daily retention runs.

    Positions 2 days old (by every sample and receive time in the store) are younger than
    keep_days = 90 in reality; the command trusts `now` with no sanity check against the data.
    """
    store, url = _open(kind, tmp_path, request)
    recent = _shift(batch(0, 10, epoch="recent"), 198 * DAY_MS)
    store.ingest(recent, content_hash(encode_batch(recent)), T + 198 * DAY_MS + 3_600_000)
    store.close()
    conn = dbapi.connect(url)
    create_tables(conn)
    dbapi.execute(conn, "INSERT INTO aggregate_builds (scheme, period, built_utc_ms) VALUES ('segment','all',?)",
                  (BUILD,))
    if not dbapi.is_sqlite(conn):
        conn.commit()
    p = apply(conn, 90, BUILD + 5 * 365 * DAY_MS)
    after = _gps_by_epoch(conn)
    conn.close()
    print("plan:", p.lines())
    assert after.get("recent", 0) == 10, f"2-day-old positions dropped on a clock jump: {after}; {p.lines()}"
