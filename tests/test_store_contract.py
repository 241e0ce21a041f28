"""One behaviour, two backends: the store checks of test_receiver_store.py on SQLite and PostgreSQL.

Each test gets ``make(**kw)``, which opens a store of the backend under test
on an empty database; ``q`` runs a query on either (``?`` placeholders).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.errors import PayloadError
from receiver.ingest import Ingestor
from receiver.store import SQLiteStore
from tests.pg import PgCluster, pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_receiver_store import RECEIVED, batch, put
from core.wire import Gap, content_hash, decode_ack, encode_ack, encode_batch

MakeStore = Callable[..., Any]


@pytest.fixture(params=["sqlite", "postgres"])
def make(request: pytest.FixtureRequest, tmp_path) -> Iterator[MakeStore]:  # type: ignore[no-untyped-def]
    opened: list[Any] = []
    if request.param == "sqlite":
        def factory(**kw: Any) -> Any:
            opened.append(SQLiteStore(tmp_path / "d.sqlite", **kw))
            return opened[-1]
        yield factory
    else:
        from receiver.store_pg import PostgresStore

        cluster: PgCluster = request.getfixturevalue("pg_cluster")
        name = f"t_{uuid.uuid4().hex[:12]}"
        dsn = cluster.create_database(name)

        def factory(**kw: Any) -> Any:
            opened.append(PostgresStore(dsn, **kw))
            return opened[-1]
        yield factory
    for s in opened:
        s.close()
    if request.param == "postgres":
        cluster.drop_database(name)


def q(store: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of ``query`` (written with ``?``) on either backend, as tuples."""
    if isinstance(store, SQLiteStore):
        return [tuple(r) for r in store.conn.execute(query, params).fetchall()]
    return [tuple(r) for r in store.conn.execute(query.replace("?", "%s"), params).fetchall()]


def test_ingest_is_idempotent(make: MakeStore) -> None:
    s = make()
    b = batch(0, 10)
    assert put(s, b).status == "stored"
    r = put(s, b)
    assert r.status == "duplicate" and r.duplicate_samples == 20
    c = s.counts()
    assert c["samples"] == 20 and c["batches_duplicate"] == 1 and c["samples_duplicate"] == 20
    assert c["batches_stored"] == 1 and c["samples_stored"] == 20


def test_same_id_other_content_is_refused(make: MakeStore) -> None:
    s = make()
    b = batch(0, 3)
    put(s, b)
    b.samples[0].values["pm25"] = 999.0
    with pytest.raises(PayloadError, match="different content"):
        put(s, b)
    (v,) = q(s, "SELECT vals FROM samples WHERE seq=1")[0]
    assert (json.loads(v) if isinstance(v, str) else v) == {"pm25": 10.0}
    assert s.counts()["samples"] == 6


def test_overlapping_batch_stores_only_the_new_samples(make: MakeStore) -> None:
    """A re-sealed range that overlaps stored samples: the old ones stay, the rest goes in."""
    s = make()
    put(s, batch(0, 5))  # seqs 1-10
    r = put(s, batch(3, 5))  # seqs 7-16
    assert (r.status, r.new_samples, r.duplicate_samples) == ("stored", 6, 4)
    c = s.counts()
    assert c["samples"] == 16 and c["samples_duplicate"] == 4 and c["samples_stored"] == 16
    assert q(s, "SELECT batch_id FROM samples WHERE seq=7") == [("van-001/e1/1-10",)]
    states = dict(q(s, "SELECT seq, state FROM positions"))
    assert all(states[2 * i + 1] == "interpolated" for i in range(1, 8))


def test_positions_join_within_and_across_batches(make: MakeStore) -> None:
    s = make(max_gap_s=10)
    put(s, batch(0, 5))
    rows = dict(q(s, "SELECT seq, state FROM positions"))
    assert all(rows[2 * i + 1] == "interpolated" for i in range(1, 5))
    assert rows[1] in ("pending", "no_fix")
    (lat,) = q(s, "SELECT lat FROM positions WHERE seq=5")[0]
    assert abs(lat - (52.0 + 1e-4 + 0.8 * 1e-4)) < 1e-9


def test_pending_resolved_by_the_next_batch_and_gaps_flagged(make: MakeStore) -> None:
    s = make(max_gap_s=10)
    put(s, batch(0, 5))
    put(s, batch(5, 20, gps_off=range(5, 25)))
    put(s, batch(25, 5))
    states = dict(q(s, "SELECT seq, state FROM positions"))
    assert states[2 * 10 + 1] == "no_fix"
    assert states[2 * 26 + 1] == "interpolated"


def test_late_backlog_upgrades_no_fix(make: MakeStore) -> None:
    s = make(max_gap_s=10)
    put(s, batch(0, 3))
    put(s, batch(30, 3))
    put(s, batch(3, 27))
    states = dict(q(s, "SELECT seq, state FROM positions"))
    assert all(st in ("interpolated", "exact") for seq, st in states.items() if seq > 1)


def test_gaps_are_stored(make: MakeStore) -> None:
    s = make()
    put(s, batch(10, 2), gaps=[Gap(1, 20, "buffer cap: oldest dropped")])
    assert q(s, "SELECT first_seq, last_seq, reason FROM gaps") == [(1, 20, "buffer cap: oldest dropped")]


def test_observations_view(make: MakeStore) -> None:
    s = make()
    put(s, batch(0, 3))
    assert q(s, "SELECT quantity, value, position FROM observations WHERE seq=3") == [
        ("pm25", 11.0, "interpolated")
    ]
    (t,) = q(s, "SELECT time_utc FROM observations WHERE seq=3")[0]
    if isinstance(s, SQLiteStore):  # SQLite has no time type: ISO 8601 text
        assert t == "2026-09-21T14:13:21.000Z"
    else:  # PostgreSQL: a timestamptz, so analysts compare and truncate times without parsing
        assert t == dt.datetime(2026, 9, 21, 14, 13, 21, tzinfo=dt.timezone.utc)


def test_ingestor_accepts_and_rejects(make: MakeStore) -> None:
    s = make()
    ing = Ingestor(s)
    b = batch(0, 2)
    payload = encode_batch(b)
    out = ing.handle("datalab/v1/van-001/batch", payload, RECEIVED)
    assert out.device == "van-001" and out.ack.status == "stored"
    assert ing.handle("datalab/v1/van-001/batch", payload, RECEIVED).ack.status == "duplicate"
    out = ing.handle("datalab/v1/van-002/batch", payload, RECEIVED)
    assert out.ack.status == "rejected" and "claims device" in out.ack.reason
    out = ing.handle("datalab/v1/van-002/batch", b"\x00garbage", RECEIVED)
    assert out.ack.status == "rejected" and out.ack.sha256 == content_hash(b"\x00garbage")
    assert decode_ack(encode_ack(out.ack)) == out.ack
    dl = q(s, "SELECT device, reason, payload FROM dead_letters ORDER BY id")
    assert [d for d, _, _ in dl] == ["van-002", "van-002"]
    assert bytes(dl[1][2]) == b"\x00garbage"
    assert s.counts()["samples"] == 4 and s.counts()["dead_letters"] == 2


def test_impossible_times_are_never_stored(make: MakeStore) -> None:
    s = make()
    b = batch(0, 3)
    b.samples[0].t_utc_ms = 315_964_800_000
    b.samples[2].t_utc_ms = RECEIVED + 400 * 86_400_000
    b.samples[4].t_utc_ms = None
    put(s, b)
    rows = dict(q(s, "SELECT seq, t_utc_ms FROM samples"))
    assert rows[1] is None and rows[3] is None and rows[5] is None
    assert rows[2] is not None
    (flags,) = q(s, "SELECT flags FROM samples WHERE seq=1")[0]
    assert "time_implausible" in flags
    assert q(s, "SELECT state FROM positions WHERE seq=1") == [("no_time",)]


def test_reopening_keeps_state(make: MakeStore) -> None:
    """Closing and reopening the store keeps everything, and duplicates are still found."""
    s = make()
    put(s, batch(0, 4))
    s.close()
    s2 = make()
    assert put(s2, batch(0, 4)).status == "duplicate"
    assert s2.counts()["samples"] == 8
    assert s2.device_summary() == [
        {"device": "van-001", "epoch": "e1", "samples": 8, "min_seq": 1, "max_seq": 8,
         "last_utc_ms": RECEIVED - 3_600_000 + 3_200}
    ]


def test_same_state_on_both_backends(tmp_path, pg_cluster: PgCluster) -> None:  # noqa: F811
    """The same deliveries leave identical tables in SQLite and PostgreSQL."""
    from receiver.store_pg import PostgresStore

    dsn = pg_cluster.create_database()
    stores = [SQLiteStore(tmp_path / "same.sqlite"), PostgresStore(dsn)]
    # (first tick, ticks, ticks without a fix): out of order, a duplicate, an overlap, a tunnel
    plan = [(0, 5, ()), (30, 3, ()), (5, 20, range(8, 22)), (0, 5, ()), (25, 5, ()), (3, 6, ())]
    for s in stores:
        for first, n, off in plan:
            put(s, batch(first, n, gps_off=off))
    tables = {
        "positions": "SELECT seq, t_utc_ms, state, round(lat * 1e9), round(lon * 1e9), speed_mps,"
                     " fix_quality FROM positions ORDER BY seq",
        "fixes": "SELECT seq, t_utc_ms, lat, lon FROM fixes ORDER BY seq",
        "samples": "SELECT seq, sensor, t_utc_ms, batch_id, flags FROM samples ORDER BY seq",
        "batches": "SELECT batch_id, n_samples, sha256 FROM batches ORDER BY batch_id",
    }
    for name, query in tables.items():
        a, b = (q(s, query) for s in stores)
        assert a == [tuple(float(x) if isinstance(x, float) else x for x in r) for r in b], name
    assert stores[0].counts() == stores[1].counts()
    for s in stores:
        s.close()


def test_quality_status_and_known_batches(make: MakeStore) -> None:
    """The later additions to the Store protocol behave alike on both backends."""
    s = make()
    b = batch(0, 3)
    b.samples[2].values["pm25"] = -5.0  # a negative concentration gets a flag
    put(s, b)
    rows = q(s, "SELECT seq, quality FROM observations WHERE seq = 3")
    assert rows and "negative" in rows[0][1]
    (sha,) = q(s, "SELECT sha256 FROM batches WHERE batch_id = ?", "van-001/e1/1-6")[0]
    assert s.known_batches(["van-001/e1/1-6", "nope"]) == [("van-001/e1/1-6", sha)]
    s.count("acks_lost", 2)
    s.record_status("van-001", {"online": True, "battery": 0.8}, RECEIVED)
    s.record_status("van-001", {"online": False}, RECEIVED + 1)
    assert s.counts()["acks_lost"] == 2
    # the last will says offline; the last heartbeat's figures stay beside it
    assert s.fleet_status() == [
        {"device": "van-001", "received_utc_ms": RECEIVED + 1, "online": False, "battery": 0.8}
    ]


def test_values_json_cannot_hold_are_refused_and_others_stored_exactly(make: MakeStore) -> None:
    """NaN/infinity are not JSON: the batch is refused (a dead letter, never a null in
    their place); big integers, unicode and None go in and come back as sent."""
    s = make()
    for bad in (float("nan"), float("inf"), {"deep": float("-inf")}):
        b = batch(0, 2)
        b.samples[1].values["pm25"] = bad
        with pytest.raises(PayloadError, match="NaN or infinity"):  # (the wire cannot even carry it)
            s.ingest(b, "sha-of-a-v1-json-upload", RECEIVED)
    assert s.counts()["samples"] == 0
    b = batch(0, 2)
    odd = {"pm25": None, "big": 2**70, "text": "µg/m³ ✓"}
    b.samples[0].values.update(odd)
    assert put(s, b).status == "stored"
    (v,) = q(s, "SELECT vals FROM samples WHERE seq=1")[0]
    got = json.loads(v) if isinstance(v, str) else v
    assert {k: got[k] for k in odd} == odd
