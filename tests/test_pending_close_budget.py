"""Issue 13 re-test, point 2: one small upload must not close a van's whole pending backlog inline.

The tester's shape, CI-sized: a van without GPS uploads samples packed in time (all stay
``pending``), then ONE 1-sample upload 1,000 s later. ``_close_pending`` closed every pending
row in one UPDATE in the ack path (480,000 rows: over PostgreSQL's statement timeout,
retried for ever, van B never acked). Now at most CLOSE_BUDGET rows close inline per ingest
group; the rest wait in ``positions_redo`` (counted) and the deriver closes them in chunks,
after which every position is what ``locate`` gives. Both stores.
"""
from __future__ import annotations

from typing import Any

import pytest

from core.sample import Sample, TimeSource
from receiver import store as store_mod
from receiver.positions import NO_FIX, PENDING
from tests.pg import pg_cluster  # noqa: F401  (fixture, used by name)
from tests.test_derive import backend  # noqa: F401  (fixture: SQLite and PostgreSQL)
from core.wire import Batch, content_hash, encode_batch

T0 = 1_795_000_000_000
N = 3_000  # samples per packed GPS-less upload
UPLOADS = 2
BUDGET = 500  # CLOSE_BUDGET for the test: the backlog is 12 x larger


def packed(k: int) -> Batch:
    first = k * N + 1
    # one ms apart, interleaved: the whole backlog sits within a few seconds
    s = [Sample("pm", T0 + i * UPLOADS + k, i, TimeSource.NTP, {"pm25_ugm3": 5.0}, (), first + i, "b")
         for i in range(N)]
    return Batch("van-nofix", "e-nofix", first, first + N - 1, s)


def one_sample_later() -> Batch:
    seq = UPLOADS * N + 1
    return Batch("van-nofix", "e-nofix", seq, seq,
                 [Sample("pm", T0 + 1_000_000, 0, TimeSource.NTP, {"pm25_ugm3": 5.0}, (), seq, "b")])


def states(store: Any) -> dict[str, int]:
    return dict(store.conn.execute(
        "SELECT state, count(*) FROM positions WHERE device = 'van-nofix' GROUP BY state").fetchall())


def test_one_sample_upload_closes_a_bounded_number_inline(backend: Any,  # noqa: F811
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "CLOSE_BUDGET", BUDGET, raising=False)
    open_, _ = backend()
    store = open_()
    for k in range(UPLOADS):
        b = packed(k)
        assert store.ingest(b, content_hash(encode_batch(b)), T0, derive=True).status == "stored"
    assert states(store) == {PENDING: UPLOADS * N}
    late = one_sample_later()
    assert store.ingest(late, content_hash(encode_batch(late)), T0, derive=True).status == "stored"
    after = states(store)
    counts = store.counts()
    print(f"\n1-sample upload over {UPLOADS * N} pending: inline {after}; deferred windows "
          f"{store.positions_deferred()}, counters pending_closes_deferred="
          f"{counts.get('pending_closes_deferred')}")
    # The old code closed all 6,000 here.
    assert after.get(NO_FIX, 0) == BUDGET
    assert after[PENDING] == UPLOADS * N - BUDGET + 1  # + the new sample, itself pending
    assert store.positions_deferred() >= 1 and counts["pending_closes_deferred"] == 1

    # A second upload right behind adds no overlapping window and closes its own budget.
    late2 = Batch("van-nofix", "e-nofix", late.last_seq + 1, late.last_seq + 1,
                  [Sample("pm", T0 + 1_000_500, 0, TimeSource.NTP, {"pm25_ugm3": 5.0}, (), late.last_seq + 1, "b")])
    assert store.ingest(late2, content_hash(encode_batch(late2)), T0, derive=True).status == "stored"
    assert states(store).get(NO_FIX, 0) == 2 * BUDGET
    windows = store.conn.execute("SELECT lo_ms, hi_ms FROM positions_redo ORDER BY lo_ms").fetchall()
    assert all(b[0] > a[1] for a, b in zip(windows, windows[1:])), windows  # disjoint
    assert store.counts()["pending_closes_deferred"] <= 2

    # The deriver's chunked pass closes the rest: every old sample is no_fix, as locate says.
    store.derive_pending()
    assert store.positions_deferred() == 0
    assert states(store) == {NO_FIX: UPLOADS * N, PENDING: 2}
    assert store.counts()["positions_placed_later"] >= UPLOADS * N - 2 * BUDGET
