"""Issue 13, points 1 and 2 at the Ingestor: one outcome per upload, validation at the door.

Real stores (SQLite, and a throwaway PostgreSQL from tests/pg.py), no broker:
the hostile-van suite (tests/test_hostile_vans.py) runs the same uploads through
a real Mosquitto and the real receiver. Uploads come from tests/hostile.py:
Hypothesis-generated batches with one defect each (or none), and issue 13's
known killers; each knows the answer it must get, by the defect it carries.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections import Counter
from typing import Any
from urllib.parse import urlparse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import PayloadError, StoreUnavailable
from receiver.ingest import PROBE_COUNTER, Ingestor, clean_text
from receiver.store import SQLiteStore
from receiver.validate import check_batch, check_status, json_depth, show
from tests.hostile import (
    DEFECTS,
    HOSTILE_STATUS,
    REJECTED,
    STORED,
    Hostile,
    hostile_sync,
    hostile_upload,
    killers,
    ordinary,
)
from tests.pg import PgCluster, pg_cluster, pg_dsn  # noqa: F401
from core.wire import Batch, content_hash, decode_ack, encode_ack

TOPIC = "datalab/v1/van-a/batch"
RECEIVED = 1_790_000_000_000 + 3_600_000
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def open_store(kind: str, where: Any) -> Any:
    if kind == "sqlite":
        return SQLiteStore(where / "d.sqlite")
    from receiver.store_pg import PostgresStore

    return PostgresStore(where)


@pytest.fixture(params=["sqlite", "pg"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    where = tmp_path if request.param == "sqlite" else request.getfixturevalue("pg_dsn")
    s = open_store(request.param, where)
    yield s
    s.close()


def dead_letters(store: Any) -> list[tuple[str, str, bytes]]:
    rows = store.conn.execute("SELECT sha256, reason, payload FROM dead_letters ORDER BY id").fetchall()
    return [(sha, reason, bytes(p)) for sha, reason, p in rows]


def follow_up(h: Hostile, epoch: str) -> bytes:
    """An ordinary batch right after ``h`` in the same epoch: it reads h's samples as context."""
    return ordinary("van-a", h.next_seq).build(epoch)


# -- the killers, on both stores ------------------------------------------------


def test_killers_get_their_outcome_and_poison_nothing(store: Any) -> None:
    seen: Counter[tuple[str, str]] = Counter()
    for i, h in enumerate(killers("van-a")):
        epoch = f"k{i}"
        payload = h.build(epoch)
        # The killer and an ordinary batch after it in one group, then one more alone.
        out = Ingestor(store).handle_many([(TOPIC, payload, RECEIVED), (TOPIC, follow_up(h, epoch), RECEIVED)])
        assert len(out) == 2
        assert out[0].ack.status == h.expect, (h.kind, out[0].ack.reason)
        assert out[1].ack.status == STORED, (h.kind, out[1].ack.reason)
        nxt = ordinary("van-a", h.next_seq + 6).build(epoch)
        assert Ingestor(store).handle(TOPIC, nxt, RECEIVED).ack.status == STORED, h.kind
        if h.expect == REJECTED:
            sha, reason, kept = dead_letters(store)[-1]
            assert sha == content_hash(payload) and kept == payload[: 1 << 20], h.kind
            assert reason and len(reason) <= 500 and "\x00" not in reason, h.kind
            assert out[0].ack.reason == reason
            encode_ack(out[0].ack)  # the answer itself can be sent
        seen[(h.kind, out[0].ack.status)] += 1
    print(f"\n{type(store).__name__}: killers by outcome: {sorted(seen.items())}")
    assert len(seen) == len(killers("van-a")) >= 25
    assert sum(n for (_, st), n in seen.items() if st == REJECTED) >= 25


# -- generated uploads --------------------------------------------------------------------


def _run_generated(store: Any, per_kind: int) -> Counter[tuple[str, str]]:
    """A property per defect kind: the upload gets the answer its defect calls for, and an
    ordinary batch after it in the same group and epoch is stored (nothing is poisoned)."""
    ing = Ingestor(store)
    epochs = itertools.count()
    seen: Counter[tuple[str, str]] = Counter()
    for kind in DEFECTS:
        @settings(FUZZ, max_examples=per_kind)
        @given(hostile_upload("van-a", kind))
        def one(h: Hostile) -> None:
            epoch = f"g{next(epochs)}"
            out = ing.handle_many([(TOPIC, h.build(epoch), RECEIVED), (TOPIC, follow_up(h, epoch), RECEIVED)])
            assert out[0].ack.status == h.expect, (h.kind, out[0].ack.reason)
            assert out[1].ack.status == STORED, (h.kind, out[1].ack.reason)
            seen[(h.kind, out[0].ack.status)] += 1

        one()
    return seen


def test_generated_uploads_each_get_their_outcome_sqlite(tmp_path: Any) -> None:
    store = SQLiteStore(tmp_path / "d.sqlite")
    seen = _run_generated(store, 6)
    print(f"\ngenerated uploads by kind and outcome: {sorted(seen.items())}")
    assert {k for k, _ in seen} == set(DEFECTS)
    rejected = sum(n for (_, st), n in seen.items() if st == REJECTED)
    assert len(dead_letters(store)) == rejected > 50
    # Each rejected upload counted once; equal bytes sent again (Hypothesis may draw them) apart.
    counts = store.counts()
    assert counts["dead_letters"] == len({sha for sha, _, _ in dead_letters(store)})
    assert counts["dead_letters"] + counts.get("dead_letters_repeated", 0) == rejected


def test_generated_uploads_each_get_their_outcome_postgres(pg_dsn: str) -> None:
    from receiver.store_pg import PostgresStore

    store = PostgresStore(pg_dsn)
    try:
        seen = _run_generated(store, 3)
        print(f"\ngenerated uploads on PostgreSQL by kind and outcome: {sorted(seen.items())}")
        rejected = sum(n for (_, st), n in seen.items() if st == REJECTED)
        assert {k for k, _ in seen} == set(DEFECTS)
        assert len(dead_letters(store)) == rejected > 40
    finally:
        store.close()


# -- a failing store: told apart from a bad upload by what fails -------------------------


class RefusesOne(SQLiteStore):
    """A real SQLite store whose write fails, the way no validation foresaw, for one batch
    (``times`` times, then it works)."""

    culprit = ""
    times = 1_000

    def _store_raw(self, batch: Batch, sha256: str, received_ms: int) -> Any:
        if batch.epoch == self.culprit and self.times > 0:
            self.times -= 1
            raise sqlite3.IntegrityError("constraint failed in a way nobody expected")
        return super()._store_raw(batch, sha256, received_ms)


def test_an_upload_the_store_refuses_is_rejected_alone(tmp_path: Any) -> None:
    store = RefusesOne(tmp_path / "d.sqlite")
    store.culprit = "bad"
    msgs = [(TOPIC, ordinary("van-a").build(e), RECEIVED) for e in ("one", "bad", "two")]
    out = Ingestor(store).handle_many(msgs)
    assert [o.ack.status for o in out] == [STORED, REJECTED, STORED]
    assert "the store could not hold this upload: IntegrityError" in out[1].ack.reason
    assert [sha for sha, _, _ in dead_letters(store)] == [content_hash(msgs[1][1])]
    # Probed after each of its two tries: the store took both trivial writes.
    assert store.counts()[PROBE_COUNTER] == 2 and store.counts()["samples"] == 12
    print(f"\ngroup of 3 with one refused write: {[o.ack.status for o in out]}")


def test_a_write_that_fails_once_is_tried_again_not_rejected(tmp_path: Any) -> None:
    store = RefusesOne(tmp_path / "d.sqlite")
    store.culprit, store.times = "flaky", 2  # the group's try and the first single try
    msgs = [(TOPIC, ordinary("van-a").build(e), RECEIVED) for e in ("one", "flaky")]
    assert [o.ack.status for o in Ingestor(store).handle_many(msgs)] == [STORED, STORED]
    assert dead_letters(store) == [] and store.counts()[PROBE_COUNTER] == 1
    print("\na write that failed once (then the store took a probe) stored on its second try")


class RefusesPayloads(SQLiteStore):
    """A real SQLite store that cannot keep a dead letter's payload (and says nothing of why)."""

    def dead_letter_many(self, items: Any) -> None:
        if any(d.payload for d in items):
            raise sqlite3.IntegrityError("no room for this payload")
        super().dead_letter_many(items)


def test_a_dead_letter_the_store_refuses_is_kept_without_its_payload(tmp_path: Any) -> None:
    store = RefusesPayloads(tmp_path / "d.sqlite")
    out = Ingestor(store).handle(TOPIC, b"junk", RECEIVED)
    assert out.ack.status == REJECTED and out.ack.sha256 == content_hash(b"junk")
    ((sha, reason, kept),) = dead_letters(store)
    assert sha == content_hash(b"junk") and kept == b"" and "payload not kept" in reason
    print(f"\ndead letter refused with its payload, kept without: {reason[:80]}")


def test_disk_full_is_an_outage_not_a_bad_upload(tmp_path: Any) -> None:
    """SQLite's own "database or disk is full" (a page cap here): a tiny counter write may still
    fit, so the probe alone would blame the upload; the store names it an outage."""
    store = SQLiteStore(tmp_path / "d.sqlite")
    ing = Ingestor(store)
    assert ing.handle(TOPIC, ordinary("van-a").build("e0"), RECEIVED).ack.status == STORED
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages}")
    big = ordinary("van-a", 1, 400).build("e1")
    with pytest.raises(StoreUnavailable, match="full"):
        ing.handle_many([(TOPIC, big, RECEIVED)])
    assert dead_letters(store) == []
    store.conn.execute(f"PRAGMA max_page_count = {pages * 1000}")  # space again
    assert ing.handle(TOPIC, big, RECEIVED).ack.status == STORED
    print("\ndisk full: StoreUnavailable, no dead letter; with space again the batch stored")


def test_a_locked_database_is_an_outage_not_a_bad_upload(tmp_path: Any) -> None:
    store = SQLiteStore(tmp_path / "d.sqlite")
    store.conn.execute("PRAGMA busy_timeout = 200")
    other = sqlite3.connect(tmp_path / "d.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    msgs = [(TOPIC, ordinary("van-a").build("e1"), RECEIVED), (TOPIC, b"junk", RECEIVED)]
    with pytest.raises(StoreUnavailable, match="locked"):
        Ingestor(store).handle_many(msgs)
    other.execute("ROLLBACK")
    assert [o.ack.status for o in Ingestor(store).handle_many(msgs)] == [STORED, REJECTED]
    print("\nlocked database: StoreUnavailable; unlocked: stored and rejected")


def test_a_store_outage_raises_and_answers_nothing_sqlite(tmp_path: Any) -> None:
    store = SQLiteStore(tmp_path / "d.sqlite")
    msgs = [(TOPIC, ordinary("van-a").build("e1"), RECEIVED), (TOPIC, b"not a batch", RECEIVED)]
    store.conn.close()  # the database is gone from under the receiver
    with pytest.raises(StoreUnavailable):
        Ingestor(store).handle_many(msgs)
    with pytest.raises(StoreUnavailable):
        Ingestor(store).handle_many(msgs[1:])  # a rejection needs the store too: its dead letter
    # Nothing was lost or half-answered: with the store back, both get their outcome.
    back = SQLiteStore(tmp_path / "d.sqlite")
    assert back.counts().get("dead_letters", 0) == 0 and back.counts()["samples"] == 0
    assert [o.ack.status for o in Ingestor(back).handle_many(msgs)] == [STORED, REJECTED]
    print("\nclosed database: StoreUnavailable for a good and a bad upload; reopened: both answered")


def test_a_store_outage_raises_and_answers_nothing_postgres(pg_cluster: PgCluster, pg_dsn: str) -> None:
    from receiver.store_pg import PostgresStore

    store = PostgresStore(pg_dsn)
    ing = Ingestor(store)
    assert ing.handle(TOPIC, ordinary("van-a").build("e0"), RECEIVED).ack.status == STORED
    pg_cluster.drop_database(urlparse(pg_dsn).path.lstrip("/"))  # the database goes away for good
    with pytest.raises(StoreUnavailable):
        ing.handle_many([(TOPIC, ordinary("van-a").build("e1"), RECEIVED), (TOPIC, b"junk", RECEIVED)])
    assert ing.counters == {"stored": 1, "duplicate": 0, "rejected": 0}
    print("\nPostgreSQL database dropped: StoreUnavailable, nothing answered")


# -- status and sync requests never stop the worker ----------------------------------------

def test_hostile_status_is_ignored_and_a_good_one_kept(store: Any) -> None:
    ing = Ingestor(store)
    for p in HOSTILE_STATUS:
        ing.handle_status("van-a", p, RECEIVED)  # must not raise
    assert store.fleet_status() == []
    ing.handle_status("van-a", b'{"v":1,"online":true,"backlog":3,"sensors":{"pm":"ok"}}', RECEIVED)
    ing.handle_status("van-a", b'{"v":1,"online":false}', RECEIVED + 1)
    (row,) = store.fleet_status()
    assert row["online"] is False and row["backlog"] == 3 and row["sensors"] == {"pm": "ok"}
    print(f"\n{len(HOSTILE_STATUS)} hostile status messages ignored, the good one kept")


def test_hostile_sync_requests_answer_only_real_batches(store: Any) -> None:
    ing = Ingestor(store)
    good = ordinary("van-a").build("s1")
    bid = decode_ack(encode_ack(ing.handle(TOPIC, good, RECEIVED).ack)).batch_id
    answers = [[a.batch_id for a in ing.handle_sync("van-a", p)] for p in hostile_sync("van-a", bid)]
    assert answers == [[bid]] + [[]] * 6  # the real id among the junk of the first is answered
    assert [a.batch_id for a in ing.handle_sync("van-a", b'{"v":1,"batches":["' + bid.encode() + b'"]}')] == [bid]
    print(f"\n{len(answers)} hostile sync requests: only the real batch id answered")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=40,
)


def test_any_status_or_sync_json_is_kept_or_ignored_never_raised(store: Any) -> None:
    ing = Ingestor(store)
    seen: Counter[str] = Counter()

    @settings(FUZZ, max_examples=120)
    @given(_JSON, st.booleans())
    def one(value: Any, online: bool) -> None:
        status = json.dumps({"v": 1, "online": online, "x": value}).encode()
        before = store.fleet_status()
        ing.handle_status("van-s", status, RECEIVED)  # must not raise
        after = store.fleet_status()
        seen["kept" if after != before else "ignored"] += 1
        ing.handle_sync("van-s", json.dumps({"v": 1, "batches": value}).encode())  # must not raise

    one()
    print(f"\ngenerated status messages: {dict(seen)}")
    assert seen["kept"] and seen["ignored"]


# -- rows stored before the schema existed cannot poison later batches ---------------------


def test_a_stored_10_to_the_309_no_longer_poisons_the_next_batch(store: Any) -> None:
    """What issue 13 saw: such a value, stored, made the van's next batch fail (orjson reads
    it back as an infinite double). Validation keeps it out now; a row already stored is read
    as NaN."""
    ing = Ingestor(store)
    assert ing.handle(TOPIC, ordinary("van-a", 1).build("old"), RECEIVED).ack.status == STORED
    big = "1" + "0" * 309
    if isinstance(store, SQLiteStore):
        store.conn.execute(f"UPDATE samples SET vals = '{{\"pm25\":{big},\"pm10\":{big}}}' WHERE sensor = 'pm'")
    else:
        store.conn.execute(f"UPDATE samples SET vals = '{{\"pm25\":{big},\"pm10\":{big}}}'::jsonb WHERE sensor = 'pm'")
    out = ing.handle(TOPIC, ordinary("van-a", 7).build("old"), RECEIVED)
    assert out.ack.status == STORED, out.ack.reason
    print("\na stored 10^309 read back as NaN: the van's next batch stored")


# -- the schema's pieces --------------------------------------------------------------------


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth('{"a":[1,{"b":"[[[[["}]}') == 3
    assert json_depth('["\\"[[[", []]') == 2
    assert json_depth("[" * 33 + "]" * 33) == 33


def test_reasons_quote_hostile_names_escaped_and_short() -> None:
    assert show("a\x00b") == "'a\\x00b'"
    assert len(show("x" * 10_000)) == 40
    assert clean_text("a\x00\ud800b") == "a\\x00\\ud800b"
    with pytest.raises(PayloadError, match="must have 1 to 128"):
        check_batch(Batch("van-a", "", 1, 1, []))
    with pytest.raises(PayloadError, match="nested more than 32"):
        check_status({"a": json.loads("[" * 40 + "]" * 40)})


def test_bounds_are_inclusive_at_the_edges() -> None:
    h = next(x for x in killers("van-a") if x.kind == "valid_extremes")
    from core.wire import decode_batch

    check_batch(decode_batch(h.build("e")))  # int64 ends, +-1e15, lat 90, lon -180, quality 9


def test_a_flag_with_a_comma_is_refused_even_when_a_name_of_the_batch_has_the_same_text() -> None:
    """Flags are stored comma-joined, so 'a,b' would come back as two flags. The check once
    shared its per-batch cache with sensor names and value keys: a sensor named 'a,b' let the
    flag 'a,b' through."""
    from core.sample import Sample, TimeSource

    def batch(sensor: str, flag: str) -> Batch:
        s = Sample(sensor, 1_795_000_000_000, 1, TimeSource.GPS, {"v": 1.0}, (flag,), 1, "boot")
        return Batch("van-f", "e1", 1, 1, [s])

    check_batch(batch("pm", "ok"))
    for sensor in ("pm", "a,b"):
        with pytest.raises(PayloadError, match="flag"):
            check_batch(batch(sensor, "a,b"))


def test_a_redelivered_rejection_is_not_dead_lettered_twice(tmp_path: Any) -> None:
    """The broker delivers an upload again (DUP) when the receiver lost its connection before
    the ack: the same bytes on the same topic then stay one dead letter. A van sending the
    same bad bytes twice on purpose (not a redelivery) still gets two."""
    store = SQLiteStore(tmp_path / "s.sqlite")
    try:
        ing = Ingestor(store)
        bad = ("datalab/v1/van-r/batch", b"DLB\x09garbage", 1)
        ing.handle_many([bad])
        ing.handle_many([bad], redelivered={0})
        assert len(dead_letters(store)) == 1
        ing.handle_many([bad])
        assert len(dead_letters(store)) == 2
    finally:
        store.close()
