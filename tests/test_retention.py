"""Retention (issue #17.5): vans' raw positions are dropped after N days, once a map build has
used them; measured values and published maps stay. On SQLite and on PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from receiver import dbapi
from receiver.aggregate import create_tables
from receiver.cli import main
from receiver.retention import DAY_MS, apply, plan
from receiver.store import SQLiteStore
from tests.pg import PgCluster, pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_receiver_store import RECEIVED, T, batch, put
from core.wire import content_hash, encode_batch

OLD, NEW = T, T + 40 * DAY_MS  # two driving days, 40 days apart


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store with an old and a recent driving day of one van; its URL or path."""
    if request.param == "sqlite":
        url = str(tmp_path / "d.sqlite")
        s: Any = SQLiteStore(url)
    else:
        from receiver.store_pg import PostgresStore

        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        name = f"t_{uuid.uuid4().hex[:12]}"
        url = cluster.create_database(name)
        s = PostgresStore(url)
    put(s, batch(0, 10))
    recent = batch(0, 10, epoch="e2")
    for smp in recent.samples:
        smp.t_utc_ms += NEW - OLD
    s.ingest(recent, content_hash(encode_batch(recent)), RECEIVED + NEW - OLD)  # received that day too
    s.close()
    yield url
    if request.param == "postgres":
        cluster.drop_database(name)


def _counts(conn: Any) -> dict[str, int]:
    return {t: dbapi.fetchall(conn, f"SELECT count(*) FROM {t}{w}")[0][0] for t, w in (
        ("fixes", ""), ("positions", ""), ("samples", " WHERE sensor = 'gps'"),
        ("samples s", " WHERE sensor <> 'gps'"), ("observations", ""))}


def _built(conn: Any, at_ms: int) -> None:
    create_tables(conn)
    dbapi.execute(conn, "INSERT INTO aggregate_builds (scheme, period, built_utc_ms) VALUES ('segment', 'all', ?)",
                  (at_ms,))


def test_positions_go_after_the_maps_are_built(store: str) -> None:
    conn = dbapi.connect(store)
    now = NEW + DAY_MS
    before = _counts(conn)
    assert before["fixes"] == 20 and before["positions"] == 20
    # no map built yet: nothing may go, and the plan says why
    p = apply(conn, 30, now)
    assert p.cutoff_ms is None and "no map" in p.reason and _counts(conn) == before
    # a build between the two days: the old day's positions go, the recent day's stay (< 30 days)
    _built(conn, OLD + 20 * DAY_MS)
    p = plan(conn, 30, now)
    # counted from the newest row stored (that day, an hour after), as the clock is a day ahead of anything stored or built
    assert p.cutoff_ms == RECEIVED + NEW - OLD - 30 * DAY_MS and p.rows["fixes"] == 10
    assert _counts(conn) == before  # a plan changes nothing
    apply(conn, 30, now)
    after = _counts(conn)
    assert after["fixes"] == after["positions"] == after["samples"] == 10
    assert after["samples s"] == before["samples s"] == 20  # the measured values stay
    assert after["observations"] == before["observations"]
    # the old day's values lost their place: no track can be drawn from them any more
    placed = dbapi.fetchall(conn, "SELECT count(*) FROM observations WHERE lat IS NOT NULL AND t_utc_ms < ?",
                            (OLD + DAY_MS,))[0][0]
    assert placed == 0
    conn.close()


def test_positions_newer_than_the_last_build_are_kept_whatever_their_age(store: str) -> None:
    conn = dbapi.connect(store)
    _built(conn, OLD - DAY_MS)  # built before either day
    p = apply(conn, 1, NEW + 100 * DAY_MS)
    assert "kept until" in p.reason and p.rows["fixes"] == 0
    assert _counts(conn)["fixes"] == 20
    conn.close()


def test_retention_command_dry_run_then_apply(store: str, tmp_path: Path) -> None:
    conn = dbapi.connect(store)
    _built(conn, int(time.time() * 1000))  # today's build (the timer's), after both days
    conn.close()
    cfg = tmp_path / "receiver.toml"
    cfg.write_text("[receiver]\npositions_keep_days = 7\n")
    dry = CliRunner().invoke(main, ["retention", "--store", store, "--config", str(cfg), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "keep raw positions 7 days" in dry.output and "nothing changed" in dry.output
    conn = dbapi.connect(store)
    assert _counts(conn)["fixes"] == 20
    conn.close()
    done = CliRunner().invoke(main, ["retention", "--store", store, "--config", str(cfg), "--apply"])
    assert done.exit_code == 0 and "dropped" in done.output, done.output
    conn = dbapi.connect(store)
    assert _counts(conn)["fixes"] == 0  # both days older than 7 days and used by the build at NEW
    conn.close()
    bad = CliRunner().invoke(main, ["retention", "--store", store, "--keep-days", "0", "--apply"])
    assert bad.exit_code != 0 and "at least 1" in bad.output
    missing = tmp_path / "nowhere" / "x.sqlite"
    gone = CliRunner().invoke(main, ["retention", "--store", str(missing), "--apply"])
    assert gone.exit_code == 2 and "no store" in gone.output and not missing.parent.exists()


def _arrive(url: str, epoch: str, device: str, t_shift: int, received: int) -> None:
    from receiver.store_factory import open_store

    s = open_store(url)
    b = batch(0, 10, device=device, epoch=epoch)
    for smp in b.samples:
        smp.t_utc_ms += t_shift
    s.ingest(b, content_hash(encode_batch(b)), received)
    s.close()


def _gps(conn: Any) -> dict[str, int]:
    return {e: int(n) for e, n in dbapi.fetchall(
        conn, "SELECT epoch, count(*) FROM samples WHERE sensor = 'gps' GROUP BY epoch")}


def test_a_late_backlog_no_build_has_seen_is_kept(store: str) -> None:
    """v17 finding 2: a van's backlog stored after the newest build, with sample times older than
    the keep period, is kept (positions and fixes too) until a build has seen it."""
    conn = dbapi.connect(store)
    build = NEW + DAY_MS
    _built(conn, build)
    conn.commit()  # the receiver (another connection) stores the backlog next
    _arrive(store, "late", "van-002", 0, build + 3_600_000)  # driven on the OLD day, uploaded after the build
    apply(conn, 30, build + 2 * DAY_MS)
    gps = _gps(conn)
    assert gps.get("late") == 10 and "e1" not in gps and gps.get("e2") == 10, gps  # e1: mapped and old
    late_places = dbapi.fetchall(conn, "SELECT count(*) FROM fixes WHERE device = 'van-002'")[0][0]
    assert late_places == 10
    # the next build has seen it: now it goes
    dbapi.execute(conn, "UPDATE aggregate_builds SET built_utc_ms = ?", (build + 3 * DAY_MS,))
    apply(conn, 30, build + 4 * DAY_MS)
    assert "late" not in _gps(conn)
    assert dbapi.fetchall(conn, "SELECT count(*) FROM fixes WHERE device = 'van-002'")[0][0] == 0
    conn.close()


def test_a_clock_jumped_years_ahead_drops_nothing_recent(store: str) -> None:
    """v17 finding 12: 'now' five years ahead of every build and row stored is not believed."""
    conn = dbapi.connect(store)
    _built(conn, NEW + DAY_MS)
    p = apply(conn, 30, NEW + 5 * 365 * DAY_MS)
    gps = _gps(conn)
    assert gps.get("e2") == 10 and "e1" not in gps, (gps, p.lines())  # the recent day stays, the old one goes
    assert "not the clock" in p.reason
    conn.close()
